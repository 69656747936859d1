"""The Eve model: config, vision encoder, projectors, Elastic Vision FFN, decoder layer, top model, processor."""

from eve_vlm.model.configuration import EveConfig, EvfConfig
from eve_vlm.model.evf import ElasticVisionFFN, EVFOutput, RoutingStats
from eve_vlm.model.modeling import EveCausalLMOutput, EveForConditionalGeneration, EvePreTrainedModel
from eve_vlm.model.processing import EveProcessor

__all__ = [
    "EVFOutput",
    "ElasticVisionFFN",
    "EveCausalLMOutput",
    "EveConfig",
    "EveForConditionalGeneration",
    "EvePreTrainedModel",
    "EveProcessor",
    "EvfConfig",
    "RoutingStats",
]
