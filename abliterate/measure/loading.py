"""Load a chat model and its tokenizer for extraction, evaluation, search and steering.

Only safetensors weights are loaded (never pickles), remote code only when asked for, and a
folder or Hub id that is not a causal language model is one clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.arch.table import Arch, arch_for_config
from abliterate.arch.tiny import model_class
from abliterate.errors import AbliterateError, first_line
from abliterate.measure import placement

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    arch: Arch
    name: str
    # hooks installed around every forward of this view (an edit computed in memory on a shared model): one
    # loaded model then serves as both the baseline and the edited model an evaluation compares
    hooks: Callable[[], contextlib.AbstractContextManager] | None = None

    def running(self) -> contextlib.AbstractContextManager:
        """Enter around every forward or generate call: this view's hooks, if any."""
        return self.hooks() if self.hooks is not None else contextlib.nullcontext()

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's execution device when accelerate dispatched the model (its
        parameters may then be on the meta device, offloaded), else the parameters' device."""
        embed = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        execution = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            return torch.device(execution) if not isinstance(execution, int) else torch.device("cuda", execution)
        return next(self.model.parameters()).device


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return device


def compute_dtype(config, dtype: str, device: str) -> torch.dtype | str:
    """--dtype auto: the checkpoint's own dtype (one copy of the weights, half the memory of float32),
    except 16-bit formats on a CPU without native support for them (no AVX512-BF16/AMX or FP16
    kernels in oneDNN), which compute far slower there than float32."""
    if dtype != "auto":
        return DTYPES[dtype]
    saved = getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) and hasattr(torch, saved) else saved
    if device == "cpu" and saved in (torch.bfloat16, torch.float16):
        return saved if cpu_computes(saved) else torch.float32
    return "auto"


def cpu_computes(dtype: torch.dtype) -> bool:
    """Whether this CPU has native kernels for the 16-bit dtype (oneDNN's own check)."""
    mkldnn = torch.ops.mkldnn
    return bool(mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported())


def dequantised_on_cpu(config, target: str) -> dict:
    """FP8 block-scaled and MXFP4 checkpoints on a CPU: transformers' own dequantisation (value x block scale) at
    load, asked for explicitly (it would otherwise try MXFP4 kernels from the Hub where triton is installed)."""
    quantisation = getattr(config, "quantization_config", None)
    method = quantisation.get("quant_method") if isinstance(quantisation, dict) else None
    if target != "cpu" or method not in ("fp8", "mxfp4"):
        return {}
    from transformers import FineGrainedFP8Config, Mxfp4Config

    if method == "fp8":
        keep = {k: quantisation[k] for k in ("weight_block_size", "modules_to_not_convert") if k in quantisation}
        return {"quantization_config": FineGrainedFP8Config(dequantize=True, **keep)}
    return {"quantization_config": Mxfp4Config(dequantize=True,
                                               modules_to_not_convert=quantisation.get("modules_to_not_convert"))}


def load_model(source: str | Path, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False) -> LoadedModel:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    name = str(source)
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise AbliterateError(f"{name} has no config.json; pass a Hugging Face model folder or a Hub id")
    if dtype not in DTYPES:
        raise AbliterateError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise AbliterateError(f"cannot load the config of {name}: {first_line(e)}") from None
    auto_class = model_class(config)
    if not trust_remote_code:
        _check_causal_lm(name, config, auto_class)
    arch = arch_for_config(config.to_dict())
    tokenizer = load_tokenizer(name, trust_remote_code)  # first: it fails in a second where weights take minutes
    target = resolve_device(device)
    dispatch = placement.current().from_pretrained_kwargs()  # --device-map: accelerate places it (--device unused)
    if dispatch and target == "cpu" and not placement.current().max_memory:
        dispatch["max_memory"] = {"cpu": _available_ram()}
    try:  # straight onto the device (no staging copy in RAM); mmap-backed tensors when the dtype is kept
        model = auto_class.from_pretrained(
            name, dtype=compute_dtype(config, dtype, target), use_safetensors=True,
            trust_remote_code=trust_remote_code, **(dispatch or {"device_map": None if target == "cpu" else target}),
            **dequantised_on_cpu(config, target),
        )
    except OSError as e:
        raise AbliterateError(f"cannot load {name}: {first_line(e)}") from None
    except ValueError as e:
        if dispatch and "offload" in str(e):
            raise AbliterateError(f"{name} does not fit within --max-memory: pass --offload-folder DIR for the rest "
                                  f"({first_line(e)})") from None
        raise
    check_arch_modules(model, arch, name)
    if not dispatch:
        model.to(target)
    model.eval().requires_grad_(False)
    contiguous_head(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # padding is masked out: any token will do, eos by convention
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else \
            tokenizer.convert_ids_to_tokens(0)
    return LoadedModel(model, tokenizer, arch, name)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or Hub id, or one line saying what is missing."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise AbliterateError(f"cannot load the tokenizer of {name} ({first_line(e)}); the model needs its "
                              "tokenizer files (tokenizer.json or the files of its tokenizer class)") from None


def _available_ram() -> int:
    """Bytes of RAM a CPU-only dispatch may fill (accelerate's own default counts the GPUs too)."""
    import psutil

    return int(psutil.virtual_memory().available * 0.9)


def contiguous_head(model: torch.nn.Module) -> None:
    """Feed the output layer a contiguous input.

    With `logits_to_keep` (scoring, generation) transformers passes a strided slice of the hidden
    states to the LM head; for weights that do not require grad, torch 2.x on CPU then takes a slow
    matmul path (measured ~200x slower in bf16/fp16, 4x in fp32, for a [16, 1, 896] slice): the
    head of a 150k-token vocabulary then costs more than the whole decoder. A copy of one position
    per prompt is free.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_abliterate_contiguous", False):
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]) if args else None)
        head._abliterate_contiguous = True


def check_arch_modules(model: torch.nn.Module, arch: Arch, name: str) -> None:
    """The family's decoder layer list and hook modules (each in some layer) exist in the loaded model: a family file
    (--arch) that names them wrongly is one line here, not a failure deep inside a hook."""
    modules = dict(model.named_modules())
    layers = len(modules.get(arch.decoder_layers) or [None])
    paths = [arch.decoder_layers] + [p for ps in arch.hook_modules.values() for p in ps]
    missing = [p.format(layer=0) for p in paths if not any(p.format(layer=i) in modules for i in range(layers))]
    if missing:
        raise AbliterateError(f"the {arch.name!r} family names module(s) {', '.join(missing)} that {name} does not "
                              "have; fix decoder_layers or hooks in its family file (--arch)")


def _check_causal_lm(name: str, config, auto_class) -> None:
    """A family transformers can load as a causal LM, saved as one (a BertModel is not, though a
    BertLMHeadModel would be): otherwise a clear error instead of a model without its LM head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    saved_as = list(getattr(config, "architectures", None) or [])
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if type(config) not in auto_class._model_mapping or (saved_as and not any(
            a in causal or a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in saved_as)):
        what = saved_as[0] if saved_as else type(config).__name__
        raise AbliterateError(
            f"{name} is a {what}, not a causal language model; abliterate needs a chat model with a "
            "language-model head"
        )
