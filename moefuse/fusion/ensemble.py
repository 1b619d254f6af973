"""An ensemble of whole moefuse models as one model: `EnsembleModel` holds the members (each a
`MultimodalMoEModel` loaded from its folder) and one fitted combiner per task (`moefuse.fusion.ensemble_combine`),
and offers the surface evaluate, predict, serve and from_pretrained use on a single model.

Members may differ in modalities (a specialist has one), fusion kind, size and seed; the ensemble takes the union of
their modalities. Each member gets its own batch from its own collator (its tokenizer, its image size), after the
drops and corruptions of the whole ensemble were applied once to the samples, so every member sees the same altered
sample. A member that has none of a sample's modalities abstains on it.

Members whose encoder of a modality has identical weights and config (a content hash) share that encoder module,
and within one forward its output for a sample is computed once (a shared `EncoderCache` keyed by the inputs):
three seeds fine-tuned from one frozen text encoder run it once per sample, not three times.

Shapes: B samples, M members, C classes, Q modalities.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefuse.configutil import ConfigError, to_dict
from moefuse.datasets.collate import Collator, worker_seed
from moefuse.datasets.corruption import Corruption, check_corruptions, corrupt_samples
from moefuse.encoders.base import Preprocessor
from moefuse.fusion.encoder_cache import EncoderCache
from moefuse.fusion.ensemble_combine import MemberAnswers, TaskCombiner, answering, combine, gate_feature_names
from moefuse.fusion.ensemble_folder import (
    ENSEMBLE_JSON,
    EnsembleConfig,
    ensemble_card,
    read_ensemble_config,
    write_ensemble_folder,
)
from moefuse.fusion.heads import TaskOutput
from moefuse.fusion.model import ModelOutput, MultimodalMoEModel, build_collator
from moefuse.inference.predict import predict_one
from moefuse.pretrained.export_info import ExportInfo
from moefuse.pretrained.hub import PretrainedMixin, download


def member_modalities(member: MultimodalMoEModel) -> list[str]:
    """The modalities a member reads: its encoders, less those it was trained without (its export record)."""
    dropped = member.export_info.drop_modalities if member.export_info is not None else []
    return [m for m in member.encoders if m not in dropped]


def task_mismatch(members: dict[str, MultimodalMoEModel]) -> str | None:
    """Why these members cannot form an ensemble (they must answer the same tasks with the same vocabularies), as
    `member NAME: task TASK: ...`; None when they can."""
    first_name, first = next(iter(members.items()))
    want = {t.name: t for t in first.cfg.tasks}
    for name, member in members.items():
        have = {t.name: t for t in member.cfg.tasks}
        for task in sorted(set(want) | set(have)):
            if task not in have:
                return f"member {name}: task {task}: missing (member {first_name} answers it)"
            if task not in want:
                return f"member {name}: task {task}: member {first_name} does not answer it"
            if list(have[task].labels) != list(want[task].labels) or have[task].type != want[task].type:
                return (f"member {name}: task {task}: its vocabulary differs from member {first_name}'s "
                        f"({len(have[task].labels)} against {len(want[task].labels)} entries, or another order)")
    return None


def media_mismatch(members: dict[str, MultimodalMoEModel]) -> str | None:
    """Why these members cannot share one reading of raw files (their export records' media settings, the image
    size and fit and audio rate their training shards were built with, differ), as `member NAME: media.FIELD: ...`;
    None when every setting that two members both record is equal."""
    seen: dict[str, tuple[str, object]] = {}
    for name, member in members.items():
        media = member.export_info.media if member.export_info is not None else None
        for key, value in (media.settings() if media is not None else {}).items():
            first = seen.setdefault(key, (name, value))
            if first[1] != value:
                return (f"member {name}: media.{key}: {value!r}, where member {first[0]} has {first[1]!r}: raw files "
                        f"would be read for one of them as it never saw in training; ensemble members trained on "
                        f"shards built with the same settings")
    return None


def encoder_hash(encoder: nn.Module) -> str:
    """A content hash (BLAKE2b) of an encoder: its config and every tensor of its state (names, shapes, dtypes,
    bytes). Equal hashes: the same function of the same inputs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(to_dict(getattr(encoder, "cfg", None)), sort_keys=True, default=str).encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class SharedEncoder:
    """Members whose encoder of `modality` is one module (identical weights): it runs once per sample."""

    modality: str
    members: list[str]
    digest: str


def share_encoders(members: dict[str, MultimodalMoEModel]) -> list[SharedEncoder]:
    """Make members whose encoders of a modality hash equal share the first one's module (in place) -> the groups
    of two or more."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, member in members.items():
        for m, enc in member.encoders.items():
            groups.setdefault((m, encoder_hash(enc)), []).append(name)
    shared = []
    for (m, digest), names in groups.items():
        if len(names) < 2:
            continue
        for other in names[1:]:
            members[other].encoders[m] = members[names[0]].encoders[m]
        shared.append(SharedEncoder(m, names, digest))
    return shared


@dataclass
class EnsembleCollator:
    """Decoded samples -> an ensemble batch: the drops and corruptions applied once, then each member's own batch
    (`batch["members"][NAME]`), and the keys every model batch has (ids, tasks, targets, meta, task_index, labels,
    present over the ensemble's modalities), which records and metrics read."""

    members: dict[str, Collator]
    """Each member's collator (dropping the modalities it does not read)."""
    preprocessors: dict[str, Preprocessor]
    """One preprocessor per modality of the ensemble (the first member's that reads it): for the corruptions."""
    sample_fields: dict[str, tuple[str, ...]]
    """Per known modality, its sample fields."""
    drop_modalities: tuple[str, ...] = ()
    """Modalities removed from every sample (`evaluate --drop`)."""
    corrupt: tuple[Corruption, ...] = ()
    """Corruptions applied to every sample after the drops (`evaluate --corrupt`)."""
    seed: int = 0
    """Seed of the corruptions' draws (noise, partners), reseeded per epoch and per DataLoader worker."""
    _rng: random.Random = field(init=False, repr=False)
    _epoch: int = field(init=False, repr=False, default=0)
    _rng_worker: int | None = field(init=False, repr=False, default=-1)  # -1: not seeded in this process yet

    def __post_init__(self) -> None:
        unknown = [m for m in self.drop_modalities if m not in self.sample_fields]
        if unknown:
            raise ConfigError(f"unknown modality {unknown[0]!r}; this ensemble knows {', '.join(self.sample_fields)}")
        if set(self.preprocessors) <= set(self.drop_modalities):
            raise ConfigError(f"dropping {', '.join(self.preprocessors)} removes every modality the ensemble reads, "
                              f"so no sample would have an input: keep at least one")
        check_corruptions(self.corrupt, self.preprocessors, self.drop_modalities)
        self._rng = random.Random(self.seed)

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._rng_worker = epoch, -1

    def _worker_rng(self) -> random.Random:
        """The epoch's RNG, reseeded once in each DataLoader worker (`collate.worker_seed`), as a model's collator."""
        worker, seed = worker_seed(self.seed, self._epoch)
        if worker != self._rng_worker:
            self._rng, self._rng_worker = random.Random(seed), worker
        return self._rng

    def __call__(self, samples: Sequence[dict]) -> dict:
        if self.drop_modalities:
            gone = {f: None for m in self.drop_modalities for f in self.sample_fields[m]}
            samples = [{**s, **gone} for s in samples]
        if self.corrupt:
            samples = corrupt_samples(samples, self.corrupt, self.preprocessors, self.sample_fields,
                                      self._worker_rng())
        batches = {name: c(samples) for name, c in self.members.items()}
        first = next(iter(batches.values()))
        present = {m: torch.zeros(len(samples), dtype=torch.bool) for m in self.preprocessors}
        for b in batches.values():
            for m, flags in b["present"].items():
                if m in present:
                    present[m] |= flags.bool()
        return {**{k: first[k] for k in ("ids", "tasks", "targets", "meta", "task_index", "labels")},
                "present": present, "members": batches}


@dataclass
class EnsembleOutput:
    """Per-task answers of the ensemble (TaskOutput: `head_predictions` are the members' answers) and each member's
    own output. An ensemble routes no tokens itself: the routing fields are empty."""

    tasks: dict[str, TaskOutput]
    members: dict[str, ModelOutput]
    answers: dict[str, MemberAnswers] = field(default_factory=dict)  # per task: what the combiner combined
    token_mask: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    moe_layers: list = field(default_factory=list)
    modality_expert_counts: torch.Tensor | None = None
    dropped_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    routed_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))


class EnsembleModel(nn.Module, PretrainedMixin):
    """Member models and a combiner per task (see the module docstring); `from_pretrained(folder)` loads an
    ensemble folder (`moefuse.fusion.ensemble_folder`), `save_pretrained` writes one."""

    model_type = "moefuse_ensemble"
    config_class = EnsembleConfig

    def __init__(self, cfg: EnsembleConfig, members: dict[str, MultimodalMoEModel]):
        super().__init__()
        if [m.name for m in cfg.members] != list(members):
            raise ConfigError(f"members: the config lists {[m.name for m in cfg.members]}, got {list(members)}")
        problem = task_mismatch(members) or media_mismatch(members)
        if problem is not None:
            raise ConfigError(problem)
        first = next(iter(members.values()))
        for t, want in zip(first.cfg.tasks, cfg.tasks):
            if t.name != want.name or list(t.labels) != list(want.labels):
                raise ConfigError(f"tasks.{want.name}.labels: differ from the members' vocabulary of {t.name}")
        self.cfg = cfg
        self.members = nn.ModuleDict(members)
        self.member_names = self.voter_names = list(members)
        self.task_names = [t.name for t in cfg.tasks]
        self.modalities = list(first.modalities)
        self.routing_rows = [*self.modalities, "fusion"]
        self.sample_fields = first.sample_fields
        reads = {name: member_modalities(m) for name, m in members.items()}
        union = [m for m in self.modalities if any(m in r for r in reads.values())]
        self.reads = reads
        self.encoders = {m: next(members[n].encoders[m] for n, r in reads.items() if m in r) for m in union}
        self.shared = share_encoders(members)
        self.combiners = dict(cfg.combiners)
        features = gate_feature_names(union, self.member_names)
        for task, c in self.combiners.items():
            if c.rule == "gated" and c.gate_features != features:
                raise ConfigError(f"combiners.{task}.gate_features: {c.gate_features} do not fit these members "
                                  f"and modalities ({features})")
        media = next((m.export_info.media for m in members.values() if m.export_info and m.export_info.media), None)
        self.export_info = ExportInfo(media=media)

    # -- a folder others can load ----------------------------------------------------------------------------

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         device: str | Any = "cpu", config_type: type | None = None, **model_kwargs: Any
                         ) -> EnsembleModel:
        folder = Path(model_id)
        if not folder.exists():
            folder = download(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                              local_files_only=local_files_only, token=token)
        return load_ensemble(folder, device)

    def save_pretrained(self, save_directory: str | Path, *, license: str | None = None,
                        datasets: list[str] | None = None, **_: Any) -> Path:
        """The ensemble folder: each member's folder (save_pretrained, with the card's license and datasets),
        ensemble.json and the card, atomically."""
        out = Path(save_directory)
        writers = {name: (lambda folder, m=m: m.save_pretrained(folder, license=license, datasets=datasets))
                   for name, m in self.members.items()}
        return write_ensemble_folder(out, self.cfg, writers, ensemble_card(self.cfg, out.name))

    def _save_pretrained(self, save_directory: Path) -> None:
        self.save_pretrained(save_directory)

    # -- what evaluate, predict and serve use ----------------------------------------------------------------

    def collator(self, train: bool = False, seed: int = 0, drop_modalities: Sequence[str] = (),
                 corrupt: Sequence[Corruption] = ()) -> EnsembleCollator:
        if train:
            raise ConfigError("an ensemble is not trained: its members are; build it with moefuse ensemble")
        union = set(self.encoders)
        members = {}
        for name, member in self.members.items():
            lacking = [m for m in member.modalities if m in union and m not in self.reads[name]]
            lacking += [m for m in (member.export_info.drop_modalities if member.export_info else [])
                        if m not in lacking]
            members[name] = build_collator(member, train=False, drop_modalities=lacking)
        preprocessors = {m: next(members[n].preprocessors[m] for n, r in self.reads.items() if m in r)
                         for m in self.encoders}
        return EnsembleCollator(members, preprocessors, self.sample_fields, tuple(drop_modalities), tuple(corrupt),
                                seed)

    def decode_options(self) -> dict:
        options: dict = {}
        for member in self.members.values():
            for k, v in member.decode_options().items():
                if options.setdefault(k, v) != v:
                    raise ConfigError(f"the members decode {k} differently ({options[k]} and {v}): they cannot share "
                                      f"one loader")
        return options

    def cache_encoders(self, modalities: list[str], max_rows: int = 4096) -> None:
        unknown = [m for m in modalities if m not in self.encoders]
        if unknown:
            raise ConfigError(f"cannot cache {unknown[0]!r}: this ensemble encodes {', '.join(self.encoders)}")
        for member in self.members.values():
            member.cache_encoders([m for m in modalities if m in member.encoders], max_rows)

    @property
    def encoder_caches(self) -> dict[str, EncoderCache]:
        return {m: c for member in self.members.values() for m, c in member.encoder_caches.items()}

    def temperatures(self) -> dict[str, float]:
        return {t: float(c.temperature) for t, c in self.combiners.items()}

    def serving_config(self) -> dict:
        return {"ensemble": True, "members": list(self.member_names), "voters": list(self.member_names),
                "combine": self.cfg.combine, "shared_encoders": [s.modality for s in self.shared]}

    @torch.no_grad()
    def predict(self, task: str | None = None, *, min_confidence: float | None = None, **inputs: Any) -> dict:
        """One sample's answer, the record `moefuse predict` writes (see MultimodalMoEModel.predict)."""
        self.eval()
        return predict_one(self, task, min_confidence=min_confidence, **inputs)

    def parameter_counts(self) -> tuple[int, int]:
        """(parameters of the members counted one by one, parameters once shared encoders are counted once)."""
        total = sum(p.numel() for m in self.members.values() for p in m.parameters())
        return total, sum(p.numel() for p in self.parameters())

    # -- forward ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _shared_encoder_caches(self) -> Iterator[None]:
        """For one forward, the members of each shared encoder use one cache (their own persistent one where they
        have it), so the encoder runs once per sample; each member's caches are restored after."""
        saved = {name: dict(m.encoder_caches) for name, m in self.members.items()}
        try:
            for group in self.shared:
                owners = [self.members[n] for n in group.members]
                cache = next((o.encoder_caches[group.modality] for o in owners
                              if group.modality in o.encoder_caches), None) or EncoderCache(1 << 20)
                for o in owners:
                    o.encoder_caches[group.modality] = cache
            yield
        finally:
            for name, m in self.members.items():
                m.encoder_caches = saved[name]

    def _member_answers(self, batch: dict, outputs: dict[str, ModelOutput], task: str, rows: torch.Tensor
                        ) -> MemberAnswers:
        probs, answers = [], []
        c = len(self.cfg.tasks[self.task_names.index(task)].labels)
        for name in self.member_names:
            out = outputs[name].tasks.get(task) if name in outputs else None
            present = batch["members"][name]["present"]
            reads = [present[m].index_select(0, rows) for m in self.reads[name] if m in present]
            answers.append(torch.stack(reads).any(0) if reads and out is not None
                           else torch.zeros(len(rows), dtype=torch.bool))
            probs.append(out.probs.float() if out is not None else torch.full((len(rows), c), 1.0 / c))
        present = torch.stack([batch["present"][m].index_select(0, rows) for m in self.encoders], 1)
        return MemberAnswers(torch.stack(probs, 1), torch.stack(answers, 1), present)  # [B_t, M, C], [B_t, M]

    def forward(self, batch: dict) -> EnsembleOutput:
        outputs: dict[str, ModelOutput] = {}
        with self._shared_encoder_caches():
            for name, member in self.members.items():
                mb = batch["members"][name]
                if any(bool(mb["present"][m].any()) for m in self.reads[name] if m in mb["present"]):
                    outputs[name] = member(mb)  # a member that answers no sample of the batch is not run
        tasks, answers = {}, {}
        for i, task in enumerate(self.task_names):
            rows = (batch["task_index"] == i).nonzero().squeeze(1)  # [B_t]
            if rows.numel() == 0:
                continue
            x = answers[task] = self._member_answers(batch, outputs, task, rows)
            result = combine(self.combiners[task], x)
            voted = answering(x.answers)  # [B_t, M]
            votes = x.probs.argmax(-1).masked_fill(~voted, -1)  # [B_t, M]
            agreement = (votes == result.prediction[:, None]).float().sum(1) / voted.float().sum(1)
            tasks[task] = TaskOutput(rows=rows, logits=x.probs.clamp_min(1e-12).log(), voted=voted,
                                     probs=result.probs, uncalibrated=result.uncalibrated,
                                     prediction=result.prediction, head_predictions=votes, agreement=agreement)
        return EnsembleOutput(tasks=tasks, members=outputs, answers=answers)


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> EnsembleModel:
    """The ensemble of an ensemble folder: ensemble.json checked, each member loaded from its folder (checked as any
    model folder), then the combiners against the members; anything wrong is a ConfigError naming the file."""
    path = Path(path)
    cfg = read_ensemble_config(path)
    members = {}
    for entry in cfg.members:
        try:
            members[entry.name] = MultimodalMoEModel.from_pretrained(path / entry.folder, device=device)
        except ConfigError as e:
            raise ConfigError(f"ensemble member {entry.name}: {e}") from None
    try:
        model = EnsembleModel(cfg, members)
    except ConfigError as e:
        raise ConfigError(f"{path / ENSEMBLE_JSON}: {e}") from None
    return model.to(device).eval()


def build_ensemble_model(members: dict[str, MultimodalMoEModel], combiners: dict[str, TaskCombiner],
                         **settings: Any) -> EnsembleModel:
    """An ensemble of loaded members with these combiners (one per task, one rule); `settings`: the other
    EnsembleConfig fields (folds, split, figures, ...)."""
    from moefuse.fusion.ensemble_folder import MemberEntry

    first = next(iter(members.values()))
    rules = {c.rule for c in combiners.values()}
    cfg = EnsembleConfig(members=[MemberEntry(n, f"members/{n}", sum(p.numel() for p in m.parameters()))
                                  for n, m in members.items()],
                         combine=rules.pop() if len(rules) == 1 else "soft", tasks=list(first.cfg.tasks),
                         combiners=combiners, **settings)
    return EnsembleModel(cfg, members)


__all__ = ["EnsembleCollator", "EnsembleModel", "EnsembleOutput", "SharedEncoder", "build_ensemble_model",
           "encoder_hash", "load_ensemble", "media_mismatch", "member_modalities", "share_encoders", "task_mismatch"]
