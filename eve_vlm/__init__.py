"""eve-vlm: small vision-language models with Elastic Vision FFNs (Eve, arXiv 2501.04322).

Importing the package registers `EveConfig` with `AutoConfig` and `EveForConditionalGeneration` with
`AutoModelForImageTextToText`, so saved Eve models load with the Auto classes (no `trust_remote_code`).
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from eve_vlm.errors import EveError
from eve_vlm.model import EveConfig, EveForConditionalGeneration, EveProcessor, EvfConfig

AutoConfig.register("eve", EveConfig, exist_ok=True)
AutoModelForImageTextToText.register(EveConfig, EveForConditionalGeneration, exist_ok=True)
AutoProcessor.register(EveConfig, EveProcessor, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["EveConfig", "EveError", "EveForConditionalGeneration", "EveProcessor", "EvfConfig", "__version__"]
