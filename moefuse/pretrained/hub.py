"""`save_pretrained` / `from_pretrained` / `push_to_hub` for a model class, through huggingface_hub's
`ModelHubMixin`: a local folder or a Hub repository id (`owner/name`) loads the same way, as in transformers and timm.

The mixin is generic over the class (this package never imports one): the class brings `config_class` (what its
config files are read as), `from_config(cfg, arch_dir)` (build itself from them), `cfg` and `encoders` (what the
folder format writes, `moefuse.pretrained.folder`). The Hub metadata of every card (`library_name`, `tags`) is
declared once, on the mixin, the way huggingface_hub's integrations declare theirs.

Where moefuse departs from `ModelHubMixin`'s defaults, and why:

- `_save_pretrained` writes the whole folder (config.json included, with `model_type`, the way transformers writes
  it: the mixin's own config.json holds the `__init__` arguments, and moefuse's are modules, not JSON), atomically:
  a failed save leaves an earlier folder as it was. `save_pretrained` returns the folder (transformers returns
  nothing, the mixin the commit URL only when it pushes) and takes the card's `license` and `datasets`.
- `from_pretrained` checks every file of the folder before anything is allocated (`load_exported`), and turns what
  the Hub client raises (offline, no such repository, no network) into a ConfigError: one line through the CLI.
- `push_to_hub` saves into a temporary folder and uploads it in one commit, as the mixin does, with the same
  arguments plus `license` and `datasets`.
- The loaded folder's export record (media settings, calibration report, metrics, license) stays on the model as
  `model.export_info`, and `save_pretrained` writes it back: a re-saved model prepares raw files, and describes
  itself, as the original did. transformers keeps no such record; moefuse's predictions depend on it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from huggingface_hub import ModelHubMixin

from moefuse.configutil import ConfigError
from moefuse.pretrained.export_info import ExportInfo
from moefuse.pretrained.folder import export_model, load_exported

T = TypeVar("T", bound="PretrainedMixin")


class PretrainedMixin(ModelHubMixin, library_name="moefuse", tags=["moefuse", "multimodal", "mixture-of-experts"]):
    """transformers-style `save_pretrained` / `from_pretrained(folder or "owner/name")` / `push_to_hub` for a
    model class that has `config_class`, `from_config(cfg, arch_dir)`, `cfg` and `encoders` (see the module)."""

    model_type: ClassVar[str] = "moefuse"
    """config.json's `model_type`: what the Hub and AutoConfig-style tools read to know the folder's library."""
    export_info: ExportInfo | None = None
    """The export record of the folder this model was loaded from (or None): written back by save_pretrained."""

    def save_pretrained(self, save_directory: str | Path, *, license: str | None = None,
                        datasets: list[str] | None = None, config: dict | None = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None,
                        **push_to_hub_kwargs: Any) -> Path | str:
        """Write this model as a model folder (`moefuse.pretrained.folder`): safetensors weights, config.json and
        config.yaml, each encoder's architecture files, export.json (the record it was loaded with, if any) and a
        model card with the Hub's metadata, atomically; what `from_pretrained` and `moefuse predict / evaluate /
        serve` load. Nothing is pickled. `license` (a Hub license id) and `datasets` (Hub dataset ids) go into the
        card and export.json. Returns the folder, or with `push_to_hub` the commit URL of the upload to `repo_id`
        (default: the folder's name). `model_card_kwargs` is taken for the mixin's signature and unused: moefuse's
        card is written from the model and its record, not from a template."""
        if config is not None:
            raise ConfigError("save_pretrained writes config.json from the model's own config; do not pass config=")
        info = (self.export_info or ExportInfo()).with_card(license, datasets)
        folder = export_model(self, save_directory, info)
        if push_to_hub:
            return self.push_to_hub(repo_id or folder.name, license=license, datasets=datasets,
                                    model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return folder

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook: the whole model folder."""
        export_model(self, save_directory, self.export_info)

    @classmethod
    def from_pretrained(cls: type[T], pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        device: str | Any = "cpu", config_type: type | None = None, **model_kwargs: Any) -> T:
        """The model of a model folder (`save_pretrained`, a training run's model/) or of a Hub repository
        `owner/name` (downloaded into the Hub cache; `revision`, `token`, `cache_dir`, `force_download`,
        `local_files_only` as in huggingface_hub), in eval mode on `device`. A damaged folder, or a repository that
        cannot be fetched, is a ConfigError naming it. `config_type`: a subclass of `config_class` that declares
        more modalities."""
        if model_kwargs:
            raise ConfigError(f"from_pretrained: unknown argument(s) {', '.join(sorted(model_kwargs))}; the model "
                              f"is built from its folder's config")
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, device=device,
                                    config_type=config_type)

    @classmethod
    def _from_pretrained(cls: type[T], *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         device: str | Any = "cpu", config_type: type | None = None, **model_kwargs: Any) -> T:
        """The mixin's hook: a local folder as it is, a Hub id through `snapshot_download`, then `load_exported`."""
        folder = Path(model_id)
        if not folder.exists():
            folder = download(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                              local_files_only=local_files_only, token=token)
        return load_exported(folder, cls, device, config_type)

    def push_to_hub(self, repo_id: str, *, license: str | None = None, datasets: list[str] | None = None,
                    config: dict | None = None, commit_message: str = "Push model using moefuse.",
                    private: bool | None = None, token: str | None = None, branch: str | None = None,
                    create_pr: bool | None = None, allow_patterns: list[str] | str | None = None,
                    ignore_patterns: list[str] | str | None = None, delete_patterns: list[str] | str | None = None,
                    model_card_kwargs: dict[str, Any] | None = None) -> str:
        """Upload the model folder to the Hub repository `repo_id` (created if needed) in one commit, as
        `ModelHubMixin.push_to_hub` does (same arguments, plus the card's `license` and `datasets`); returns the
        commit URL. Needs a reachable Hub and a token with write access."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.split("/")[-1], license=license, datasets=datasets,
                                          config=config)
            return str(api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                                         commit_message=commit_message, revision=branch, create_pr=create_pr,
                                         allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                         delete_patterns=delete_patterns))


def download(repo_id: str, **options: Any) -> Path:
    """A Hub repository's files in the local Hub cache (`snapshot_download`) -> its folder. Anything the Hub client
    raises (an id that is neither a folder nor `owner/name`, offline mode without the files in the cache, no
    network, no such repository or revision, no access) is a ConfigError naming the id and what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="model", **options))
    except HFValidationError:
        raise ConfigError(f"{repo_id} is not a folder, nor a Hub repository id (owner/name); give the model/ folder "
                          f"a training run wrote") from None
    except Exception as e:  # huggingface_hub's errors (offline, HTTP, not found, gated) and the network's
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(f"{repo_id} is not a local folder, and not in the Hub cache (HF_HUB_OFFLINE is set: the "
                              f"Hub is not asked); give a model folder, or unset HF_HUB_OFFLINE to download "
                              f"it") from None
        said = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ConfigError(f"{repo_id} is not a local folder, and cannot be fetched from the Hub: {type(e).__name__}: "
                          f"{said}; give a model folder, or a Hub id you can reach") from None

__all__ = ["PretrainedMixin", "download"]
