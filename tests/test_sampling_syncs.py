"""The sampler's shape on a device: no host sync in the decoding loop, a bounded number of
compiled graphs whatever the number of steps, and the bf16 / compiled paths agreeing with eager
fp32."""

import pytest
import torch

from enat.config import SampleConfig
from enat.models import build_model, model_config
from enat.profiling import SyncCounter
from enat.sampling import generate, generate_all, mask_schedule
from test_models import perturb_

TINY = dict(grid_size=8, codebook_size=64, num_classes=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_(build_model(model_config("tiny", **TINY)), std=0.1).eval()


def syncs(model, labels, cfg, **kwargs) -> SyncCounter:
    with SyncCounter() as counter:
        generate(model, labels, cfg, **kwargs)
    return counter


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("cfg_scale", [2.5, 0.0])
def test_no_host_sync_in_the_decoding_loop(model, greedy, reuse, cfg_scale):
    labels = torch.tensor([1, 2, 3])
    counts = {}
    for steps in (1, 8):
        cfg = SampleConfig(steps=steps, cfg_scale=cfg_scale, greedy=greedy, reuse=reuse)
        counter = syncs(model, labels, cfg)
        counts[steps] = counter.total
        assert counter.total == 0, counter.where
    assert counts[1] == counts[8] == 0


def test_no_host_sync_with_the_nat_and_with_autocast():
    torch.manual_seed(0)
    nat = build_model(model_config("tiny", arch="nat", **TINY)).eval()
    counter = syncs(nat, torch.tensor([4, 5]), SampleConfig(steps=8, reuse=False))
    assert counter.total == 0, counter.where
    enat = build_model(model_config("tiny", **TINY)).eval()
    counter = syncs(enat, torch.tensor([4, 5]), SampleConfig(steps=8), autocast_dtype=torch.bfloat16)
    assert counter.total == 0, counter.where


class GraphCounter:
    """A dynamo backend that records every graph it is given and runs it as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.mark.slow  # end to end (compiles, fits, wandb, processes): over 8 s on 2 cores
@pytest.mark.parametrize("reuse", [True, False])
def test_compiled_sampling_compiles_a_few_graphs_once(model, reuse):
    torch._dynamo.reset()
    backend = GraphCounter()
    labels = torch.tensor([1, 2, 3, 4])
    for greedy in (True, False):
        cfg = SampleConfig(steps=8, cfg_scale=2.5, greedy=greedy, reuse=reuse)
        assert torch.equal(generate(model, labels, cfg, compile=backend), generate(model, labels, cfg))
    # Full mode at step 0 (no visible token), and the general graph; in reuse mode also the
    # first reuse step, whose previous visible set is empty (dynamo specializes sizes 0 and 1).
    expected = 3 if reuse else 2
    assert len(backend.graphs) == expected
    # Another batch size, another model of the same shapes, 6 steps: no new graph. (A step that
    # reveals exactly one token would add one: 64 tokens in 12 steps, say.)
    torch.manual_seed(1)
    other = perturb_(build_model(model_config("tiny", **TINY)), std=0.1).eval()
    for m, b, steps in [(model, 3, 8), (other, 4, 8), (model, 3, 6)]:
        cfg = SampleConfig(steps=steps, reuse=reuse)
        assert torch.equal(generate(m, labels[:b], cfg, compile=backend), generate(m, labels[:b], cfg))
    # The compiled loop reads the device no more than the eager one.
    counter = syncs(model, labels, SampleConfig(steps=8, reuse=reuse), compile=backend)
    assert counter.total == 0, counter.where
    assert len(backend.graphs) == expected


@pytest.mark.slow  # end to end (compiles, fits, wandb, processes): over 8 s on 2 cores
def test_aot_compiled_sampling_equals_eager(model):
    # aot_eager runs the AOT-traced aten graph: the compiled path without inductor's codegen time.
    torch._dynamo.reset()
    labels = torch.tensor([0, 5, 9])
    cfg = SampleConfig(steps=8, cfg_scale=2.5, greedy=True, mask_temp=0.0)
    assert torch.equal(generate(model, labels, cfg, compile="aot_eager"), generate(model, labels, cfg))


@pytest.mark.slow
def test_inductor_compiled_greedy_sampling_equals_eager(model):
    torch._dynamo.reset()
    labels = torch.tensor([0, 5, 9])
    cfg = SampleConfig(steps=8, cfg_scale=2.5, greedy=True, mask_temp=0.0)
    assert torch.equal(generate(model, labels, cfg, compile=True), generate(model, labels, cfg))


def test_bf16_autocast_runs_the_network_in_bf16_and_agrees_with_fp32(model):
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    cfg = SampleConfig(steps=8, cfg_scale=2.5, greedy=True, mask_temp=0.0)
    dtypes = []
    hook = model.decoder[0].mlp.fc1.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    try:
        trace = []
        bf16 = generate(model, labels, cfg, autocast_dtype=torch.bfloat16, trace=trace)
    finally:
        hook.remove()
    assert set(dtypes) == {torch.bfloat16}  # the network's matmuls ran in bf16
    assert (bf16 < 64).all()
    assert [int((t.input_ids == 64).sum(1)[0]) for t in trace] == mask_schedule(64, 8)
    fp32 = generate(model, labels, cfg)
    # Greedy decoding amplifies bf16 rounding (a near tie flips, later steps see other tokens),
    # so the ids are close, not equal: measured 0.98 of tokens on this model.
    assert (bf16 == fp32).float().mean() >= 0.8


def test_generate_all_passes_options(model):
    labels = torch.arange(5)
    cfg = SampleConfig(steps=4, batch_size=2)
    parts = [generate(model, labels[i:i + 2], cfg, indices=torch.arange(i, min(i + 2, 5)),
                      autocast_dtype=torch.bfloat16) for i in range(0, 5, 2)]
    assert torch.equal(generate_all(model, labels, cfg, autocast_dtype=torch.bfloat16), torch.cat(parts))


def test_sample_config_selects_dtype_and_compile(model):
    """sample.dtype / sample.compile reach every caller of generate (enat sample, the FID job, the
    trainer's grids) through the config."""
    from dataclasses import replace

    from torch._dynamo.testing import CompileCounterWithBackend

    labels = torch.arange(4)
    cfg = SampleConfig(steps=4, cfg_scale=2.0)
    by_config = generate(model, labels, replace(cfg, dtype="bfloat16"))
    assert torch.equal(by_config, generate(model, labels, cfg, autocast_dtype=torch.bfloat16))
    assert not torch.equal(by_config, generate(model, labels, cfg))
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    compiled = generate(model, labels, replace(cfg, compile=True), compile=counter)  # the argument wins
    assert counter.frame_count > 0 and torch.equal(compiled, generate(model, labels, cfg))
