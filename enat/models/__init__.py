"""The networks: ENAT, the vanilla NAT baseline, the zoo of sizes, weight files and conversion."""

from enat.models.enat import ENAT, Output
from enat.models.nat import NAT
from enat.models.zoo import ZOO, build_model, count_parameters, model_config

__all__ = ["ENAT", "NAT", "Output", "ZOO", "build_model", "count_parameters", "model_config"]
