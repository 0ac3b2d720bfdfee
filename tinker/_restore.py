"""Saved weights back into the engine: the state a load_state writes, the LoRA config a checkpoint
implies, and adapters rebuilt for sampling from a saved path.

A "source" is either a tinker:// checkpoint path from the local store, or (beyond Tinker) the
directory of any PEFT LoRA adapter, to continue training from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from . import _checkpoints as ckpt
from ._engine import load_model
from ._exceptions import BadRequestError
from ._training import LoraAdapter


@dataclass
class SavedConfig:
    base_model: str | None
    rank: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool


def _is_tinker_path(source) -> bool:
    return isinstance(source, str) and source.startswith("tinker://")


def _peft_dir(source) -> Path:
    directory = Path(source).expanduser() if isinstance(source, (str, Path)) else None
    if directory is None or not (directory / ckpt.ADAPTER_CONFIG).is_file():
        raise BadRequestError(f"{source!r} is neither a tinker:// checkpoint path nor a PEFT adapter directory "
                              f"(with {ckpt.ADAPTER_CONFIG} and {ckpt.ADAPTER_WEIGHTS})")
    return directory


def saved_config(source) -> SavedConfig:
    """The base model and LoRA config a checkpoint (or PEFT directory) was trained with."""
    if _is_tinker_path(source):
        run_id, kind, name = ckpt.parse_path(source)
        m = ckpt.read_manifest(ckpt.checkpoint_dir(run_id, kind, name), source)
        return SavedConfig(m["base_model"], m["lora_rank"], m["train_attn"], m["train_mlp"], m["train_unembed"])
    peft = ckpt.read_peft_dir(_peft_dir(source))
    return SavedConfig(peft.base_model, peft.rank, peft.train_attn, peft.train_mlp, peft.train_unembed)


def adapter_state(adapter: LoraAdapter, source, with_optimizer: bool):
    """(params, exp_avg, exp_avg_sq, step) to write into `adapter`, from a saved source. Without the
    optimizer the moments are None (zeroed) and the step 0."""
    if _is_tinker_path(source):
        loaded = ckpt.load_checkpoint(source, with_optimizer)
        base = loaded.manifest["base_model"]
        if load_model(base) is not adapter.model:
            raise BadRequestError(f"checkpoint {source} was trained on {base!r}; this client trains "
                                  f"{adapter.model.name!r}")
        m = loaded.manifest
        saved = (m["lora_rank"], m["train_attn"], m["train_mlp"], m["train_unembed"])
        if saved != (adapter.rank, adapter.train_attn, adapter.train_mlp, adapter.train_unembed):
            raise BadRequestError(
                f"checkpoint {source} (rank {saved[0]}, train_attn={saved[1]}, train_mlp={saved[2]}, "
                f"train_unembed={saved[3]}) does not match this adapter (rank {adapter.rank}, train_attn="
                f"{adapter.train_attn}, train_mlp={adapter.train_mlp}, train_unembed={adapter.train_unembed}); "
                f"create_training_client_from_state(path) makes a client with the saved config")
        params = adapter.flatten(loaded.params, f"checkpoint {source}")
        if not with_optimizer:
            return params, None, None, 0
        return (params, adapter.flatten(loaded.exp_avg, f"the optimizer state of {source}"),
                adapter.flatten(loaded.exp_avg_sq, f"the optimizer state of {source}"), loaded.step)
    if with_optimizer:
        raise BadRequestError(f"{source}: a PEFT adapter directory holds no optimizer state; use load_state")
    peft = ckpt.read_peft_dir(_peft_dir(source), adapter.model.spec.arch,  # module names of this model's arch
                              adapter.model.spec.config.get("n_experts") or None)
    if peft.rank != adapter.rank:
        raise BadRequestError(f"{source}: the adapter has rank {peft.rank}, this client {adapter.rank}")
    current = adapter.parameters()  # modules the PEFT adapter lacks keep their fresh values (B = 0)
    unknown = sorted(set(peft.params) - set(current))
    if unknown:
        raise BadRequestError(f"{source}: tensors {unknown[:3]} have no place in this adapter (train_attn="
                              f"{adapter.train_attn}, train_mlp={adapter.train_mlp}, "
                              f"train_unembed={adapter.train_unembed})")
    current.update(peft.params)
    return adapter.flatten(current, str(source)), None, None, 0


def sampling_adapter(source) -> tuple[str, LoraAdapter]:
    """(base model, an adapter holding the saved weights) for a sampler on a saved path."""
    config = saved_config(source)
    if config.base_model is None:
        raise BadRequestError(f"{source}: the adapter does not name its base model (base_model_name_or_path)")
    adapter = LoraAdapter(load_model(config.base_model), rank=config.rank, seed=0, train_mlp=config.train_mlp,
                          train_attn=config.train_attn, train_unembed=config.train_unembed)
    params, _, _, _ = adapter_state(adapter, source, with_optimizer=False)
    adapter.submit_write_all(params, None, None, 0).result()
    return config.base_model, adapter


__all__ = ["SavedConfig", "saved_config", "adapter_state", "sampling_adapter"]
