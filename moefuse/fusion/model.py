"""The multimodal MoE fusion model, top to bottom:

    per modality: encoder -> tokens [B, T_m, D_enc] + mask -> Linear to d_model + learned modality embedding
    concatenate [fusion token; modality 0; modality 1; ...] -> FusionStack (attention + SparseMoE) -> pooled [B, D]
    per task: VotingHeads -> ensemble answer, per-head votes, agreement

The model loops over its encoders (a dict, as torchmultimodal's LateFusion) and never branches on a modality's
name: what is specific to a modality lives with its encoder (`moefuse.encoders.base`). A modality a sample lacks
adds no tokens (its rows are masked out, and the encoder runs only on the samples that have it). The batch
format is documented in `moefuse.datasets.collate`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, get_args, get_type_hints

import torch
from torch import nn

from moefuse.configutil import Config, ConfigError, check
from moefuse.datasets.collate import Collator
from moefuse.datasets.corruption import Corruption
from moefuse.encoders import AudioEncoderConfig, EncoderConfig, ImageEncoderConfig, ModalityEncoder, TextEncoderConfig
from moefuse.encoders.base import AugmentConfig
from moefuse.fusion.encoder_cache import EncoderCache
from moefuse.fusion.heads import HeadsConfig, TaskConfig, TaskOutput, VotingHeads
from moefuse.fusion.moe import MoEOutput
from moefuse.fusion.stack import FusionConfig, FusionOutput, FusionStack, masked_mean
from moefuse.inference.predict import predict_one
from moefuse.pretrained.export_info import ExportInfo
from moefuse.pretrained.hub import PretrainedMixin


@dataclass
class EncodersConfig(Config):
    """One field per modality the model can take, each an EncoderConfig or null. The field order is the modality
    order (modality ids, token order, routing rows); adding a modality is adding a field."""

    config_key: ClassVar[str] = "encoders"

    text: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    """Text encoder (BERT); null = the model takes no text."""
    image: ImageEncoderConfig | None = field(default_factory=ImageEncoderConfig)
    """Image encoder (timm ViT); null = the model takes no images."""
    audio: AudioEncoderConfig | None = field(default_factory=AudioEncoderConfig)
    """Audio encoder (wav2vec2); null = the model takes no audio."""

    def __post_init__(self) -> None:
        check(bool(self.configured()), self.config_key, f"at least one of {', '.join(self.slots())} must be configured")

    def slots(self) -> dict[str, type[EncoderConfig]]:
        """Every modality this config can hold, configured or not -> its config class."""
        hints = get_type_hints(type(self))
        return {f.name: next(t for t in get_args(hints[f.name]) if t is not type(None)) for f in fields(self)}

    def configured(self) -> dict[str, EncoderConfig]:
        """The modalities that have an encoder -> their configs, in modality order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}



@dataclass
class ModelConfig(Config):
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    """Which modalities the model takes, and how each is encoded."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """The shared fusion stack."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """Voting heads per task."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Tasks with their vocabularies. In an experiment config: the tasks to train, [] = every task in the training
    shards' dataset.json; a task without labels takes its vocabulary from there before the model is built."""

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        self.check(len(names) <= 1000, "tasks", f"at most 1000 tasks, got {len(names)}")
        self.check(len(set(names)) == len(names), "tasks", f"task names must be unique, got {names}")
        rates = self.fusion.modality_dropout
        unknown = [m for m in rates if m not in self.encoders.slots()] if isinstance(rates, dict) else []
        self.check(not unknown, "fusion.modality_dropout", f"{unknown[0] if unknown else ''!r} is not a modality; "
                   f"name some of {', '.join(self.encoders.slots())}")
        chosen = self.fusion.modality_dropout_tasks
        unknown = [t for t in chosen or [] if t not in names]
        self.check(not (names and unknown), "fusion.modality_dropout_tasks", f"{unknown[0] if unknown else ''!r} is "
                   f"not a task of this model; name some of {', '.join(names)}")
        for m, enc in self.encoders.configured().items():  # augmentation by task, where an encoder has it
            augment = getattr(enc, "augment", None)
            tasks = augment.tasks if isinstance(augment, AugmentConfig) else None
            unknown = [t for t in tasks or [] if t not in names]
            self.check(not (names and unknown), f"encoders.{m}.augment.tasks", f"{unknown[0] if unknown else ''!r} "
                       f"is not a task of this model; name some of {', '.join(names)}")
        known = ["pooled", "cls", "mean", "modalities", *self.encoders.configured()]
        bad = [v for v in self.heads.views if v not in known]
        self.check(not bad, "heads.views", f"{bad[0] if bad else ''!r} is not a view of this model; use "
                   f"{', '.join(known)}")


@dataclass
class ModelOutput:
    """Per-task answers, losses, and the MoE routing stats of this batch."""

    tasks: dict[str, TaskOutput]
    pooled: torch.Tensor  # [B, D]
    aux_loss: torch.Tensor  # weighted MoE losses (0 for dense / concat fusion)
    task_loss: torch.Tensor | None  # sum over tasks of loss_weight * task loss, when labels were given
    loss: torch.Tensor | None  # task_loss + aux_loss
    balance_loss: torch.Tensor  # raw losses summed over MoE layers, for logging
    z_loss: torch.Tensor
    local_entropy_loss: torch.Tensor
    global_entropy_loss: torch.Tensor
    tokens_per_expert: torch.Tensor | None  # [L, E]
    modality_expert_counts: torch.Tensor | None  # [L, M + 1, E] rows: the model's routing_rows
    dropped_tokens: torch.Tensor  # scalar, over all layers
    routed_tokens: torch.Tensor  # scalar: real tokens x layers x top_k (the denominator of the dropped fraction)
    token_mask: torch.Tensor  # [B, T] real tokens of the fused sequence
    modality_ids: torch.Tensor  # [B, T] index into the model's routing_rows (modalities, then the fusion token)
    moe_layers: list[MoEOutput]  # per MoE layer: routing of the real tokens in [B, T] row-major order


def voter_names(views: list[str]) -> list[str]:
    """A name per voter for reports: its view, numbered where several voters read the same view (three pooled
    voters are "pooled 1", "pooled 2", "pooled 3"; a modality voter is the modality's name)."""
    counts = Counter(views)
    seen: Counter = Counter()
    names = []
    for view in views:
        seen[view] += 1
        names.append(f"{view} {seen[view]}" if counts[view] > 1 else view)
    return names


class MultimodalMoEModel(nn.Module, PretrainedMixin):
    """Encoders (one per configured modality) -> fusion stack -> voting heads per task.

    `modalities` are every modality the config knows (configured or not): modality m has id
    `modalities.index(m)` (its embedding row and routing-stats row) and the fusion token id M = len(modalities),
    so a model's ids do not depend on which of them it has. `routing_rows` names the M + 1 rows.

    `save_pretrained(folder)`, `from_pretrained(folder or "owner/name")` and `push_to_hub` come from
    `moefuse.pretrained.hub.PretrainedMixin` (huggingface_hub's ModelHubMixin); a loaded model keeps its folder's
    export record as `export_info` (media settings, calibration report, metrics, license)."""

    def __init__(self, cfg: ModelConfig, encoders: dict[str, ModalityEncoder]):
        super().__init__()
        if not cfg.tasks:
            raise ConfigError("tasks: the model needs at least one task with its labels")
        for t in cfg.tasks:
            if not t.labels:
                raise ConfigError(f"{t.key('labels')}: empty; fill it from the shards' dataset.json first")
        self.cfg = cfg
        self.modalities = list(cfg.encoders.slots())
        unknown = sorted(set(encoders) - set(self.modalities))
        if unknown:
            raise ConfigError(f"encoders: {unknown[0]!r} is not a field of {type(cfg.encoders).__name__} "
                              f"({', '.join(self.modalities)})")
        self.routing_rows = [*self.modalities, "fusion"]
        self.sample_fields = {m: cls.sample_fields for m, cls in cfg.encoders.slots().items()}  # all known modalities
        d = cfg.fusion.d_model
        self.encoders = nn.ModuleDict(encoders)
        self.project = nn.ModuleDict({m: nn.Linear(enc.out_dim, d) for m, enc in encoders.items()})
        self.modality_embed = nn.Embedding(len(self.modalities) + 1, d)  # + the fusion token's
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.fusion_token, std=0.02)
        self.fusion = FusionStack(cfg.fusion, num_modalities=len(self.modalities))
        views = ["pooled"] * cfg.heads.num_heads + cfg.heads.views
        # what each voter reads, in voter order: pooled, cls, mean or a modality (its fused tokens)
        self.voter_views = [m for v in views for m in (list(encoders) if v == "modalities" else [v])]
        self.voter_names = voter_names(self.voter_views)  # how reports name each voter
        self.heads = nn.ModuleDict({t.name: VotingHeads(d, len(t.labels), cfg.heads, len(self.voter_views))
                                    for t in cfg.tasks})
        self.task_names = [t.name for t in cfg.tasks]
        self.encoder_caches: dict[str, EncoderCache] = {}  # cache_encoders(); inference only

    # -- a folder others can load (save_pretrained, from_pretrained, push_to_hub: moefuse.pretrained.hub) ---------

    config_class = ModelConfig  # what config.yaml of a model folder is read as

    @classmethod
    def from_config(cls, cfg: ModelConfig, arch_dir: str | Path | None = None) -> MultimodalMoEModel:
        """A model with random init (the encoders' init files apart); with `arch_dir` (a model folder) each encoder
        is built from the architecture files saved there, ready for the folder's weights."""
        return cls(cfg, build_encoders(cfg.encoders, arch_dir))

    def check_export_info(self, info: ExportInfo) -> None:
        """What a model folder's export.json says about this model fits it: the modalities it was trained without
        are modalities of this model, the calibrated tasks are its tasks, and each task's vote weights are one per
        voter. Called by `from_pretrained` on the model built on the meta device, before anything is allocated."""
        unknown = [m for m in info.drop_modalities if m not in self.modalities]
        if unknown:
            raise ConfigError(f"drop_modalities: {unknown[0]!r} is not a modality of this model "
                              f"({', '.join(self.modalities)})")
        for task, c in (info.calibration or {}).items():
            if task not in self.task_names:
                raise ConfigError(f"calibration.{task}: not a task of this model ({', '.join(self.task_names)})")
            if c.vote_weights is not None and len(c.vote_weights) != len(self.voter_views):
                raise ConfigError(f"calibration.{task}.vote_weights: {len(c.vote_weights)} weights for "
                                  f"{len(self.voter_views)} voters ({', '.join(self.voter_views)})")

    def collator(self, train: bool = False, **options) -> Collator:
        """`build_collator(self, train, **options)`: the collator that turns decoded samples into this model's
        batches."""
        return build_collator(self, train, **options)

    @torch.no_grad()
    def predict(self, task: str | None = None, *, min_confidence: float | None = None, **inputs: Any) -> dict:
        """One sample's answer, the record `moefuse predict` writes (prediction, probability, top 5, votes,
        agreement, modalities, routing): `model.predict(task="avqa", question="what digit is spoken?",
        audio="clip.wav")`. Files may be paths, PIL images or arrays (audio: at the encoder's rate, or (array,
        rate)); they are prepared with the model folder's media settings, as `moefuse predict` prepares them.
        Runs in eval mode (the mode is restored after)."""
        was_training = self.training
        self.eval()
        try:
            return predict_one(self, task, min_confidence=min_confidence, **inputs)
        finally:
            self.train(was_training)

    def temperatures(self) -> dict[str, float]:
        """Each task's calibration temperature (what evaluate reports and serve's /info shows)."""
        return {t: float(h.temperature) for t, h in self.heads.items()}

    def serving_config(self) -> dict:
        """What serve's /info says of the architecture."""
        cfg = self.cfg
        return {"fusion": cfg.fusion.kind, "d_model": cfg.fusion.d_model, "layers": cfg.fusion.num_layers,
                "experts": cfg.fusion.num_experts, "top_k": cfg.fusion.top_k, "voters": list(self.voter_names),
                "combine": cfg.heads.combine}

    def cache_encoders(self, modalities: list[str], max_rows: int = 4096) -> None:
        """In eval under torch.no_grad, reuse the outputs of these modalities' encoders for inputs seen before (the
        same question): moefuse.fusion.encoder_cache. [] turns the cache off."""
        unknown = [m for m in modalities if m not in self.encoders]
        if unknown:
            raise ConfigError(f"cannot cache {unknown[0]!r}: this model encodes {', '.join(self.encoders)}")
        self.encoder_caches = {m: EncoderCache(max_rows) for m in modalities}

    # -- inputs ---------------------------------------------------------------------------------------------

    def _drop_modalities(self, present: dict[str, torch.Tensor], task_index: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
        """Modality dropout: drop each present modality with its rate, on the samples of the chosen tasks
        (fusion.modality_dropout_tasks), but never all of a sample's modalities."""
        p = torch.tensor(self.cfg.fusion.dropout_rates(list(present)))  # [M]
        stacked = torch.stack([present[m] for m in present], dim=1)  # [B, M]
        chosen = self.cfg.fusion.modality_dropout_tasks
        eligible = torch.tensor([chosen is None or t in chosen for t in self.task_names])[task_index.cpu()]  # [B]
        drop = (torch.rand(stacked.shape, device=stacked.device) < p.to(stacked.device)) & stacked
        drop &= eligible.to(stacked.device)[:, None]
        keep = stacked & ~drop
        none_left = ~keep.any(1)
        keep[none_left] = stacked[none_left]  # a sample that would lose everything keeps what it had
        return {m: keep[:, i] for i, m in enumerate(present)}

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode every present modality -> tokens [B, T, D], mask [B, T], modality_ids [B, T]."""
        b = batch["task_index"].shape[0]
        for m, flags in batch["present"].items():
            if m not in self.encoders and bool(flags.any()):
                raise ConfigError(f"the batch has {m} but the model has no {m} encoder (encoders.{m} is null)")
        present = {m: batch["present"][m].bool() for m in self.encoders}
        if self.training and any(self.cfg.fusion.dropout_rates(list(present))):
            present = self._drop_modalities(present, batch["task_index"])
        device = self.fusion_token.device
        fusion_id = len(self.modalities)
        parts = [self.fusion_token.expand(b, -1, -1) + self.modality_embed.weight[fusion_id]]  # [B, 1, D]
        masks = [torch.ones(b, 1, dtype=torch.bool, device=device)]
        ids = [torch.full((b, 1), fusion_id, device=device)]
        for m, encoder in self.encoders.items():
            rows = present[m].nonzero().squeeze(1)  # [B_m]: only the samples that have this modality
            if rows.numel() == 0:
                continue
            inputs = {k: v.index_select(0, rows) for k, v in batch["inputs"][m].items()}
            cache = self.encoder_caches.get(m) if not (self.training or torch.is_grad_enabled()) else None
            enc = encoder(**inputs) if cache is None else cache(encoder, inputs, encoder.padding_input)
            m_id = self.modalities.index(m)
            tok = self.project[m](enc.tokens) + self.modality_embed.weight[m_id]  # [B_m, T_m, D]
            full = tok.new_zeros(b, tok.shape[1], tok.shape[2]).index_copy(0, rows, tok)  # [B, T_m, D]
            mask = torch.zeros(b, tok.shape[1], dtype=torch.bool, device=device).index_copy(0, rows, enc.mask)
            parts.append(full)
            masks.append(mask)
            ids.append(torch.full(mask.shape, m_id, device=device))
        return torch.cat(parts, 1), torch.cat(masks, 1), torch.cat(ids, 1)  # [B, T, D], [B, T], [B, T]

    def decode_options(self) -> dict:
        """Keyword arguments for the shard loader's decoding, from every encoder (e.g. the audio sample rate)."""
        return {k: v for enc in self.encoders.values() for k, v in enc.decode_options().items()}

    # -- forward --------------------------------------------------------------------------------------------

    def voter_inputs(self, fused: FusionOutput, mask: torch.Tensor, modality_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each voter's view of the fused sequence -> features [B, K, D] and which voters vote [B, K] (a modality
        voter abstains where its modality is absent); with only pooled voters, the pooled [B, D] and None."""
        if all(v == "pooled" for v in self.voter_views):
            return fused.pooled, None
        x = fused.tokens  # [B, T, D]
        everyone = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        fused_views = {"pooled": fused.pooled, "cls": x[:, 0], "mean": masked_mean(x, mask)}  # [B, D] each
        features, voted = [], []
        for view in self.voter_views:
            if view in fused_views:
                features.append(fused_views[view])
                voted.append(everyone)
            else:  # a modality: the mean of its fused tokens, where the sample has any
                own = mask & (modality_ids == self.modalities.index(view))  # [B, T]
                features.append(masked_mean(x, own))
                voted.append(own.any(1))
        return torch.stack(features, 1), torch.stack(voted, 1)  # [B, K, D], [B, K]

    def forward(self, batch: dict) -> ModelOutput:
        tokens, mask, modality_ids = self.embed(batch)
        fused = self.fusion(tokens, mask, modality_ids)
        features, voted = self.voter_inputs(fused, mask, modality_ids)
        labels = batch.get("labels")
        outputs: dict[str, TaskOutput] = {}
        task_loss = None
        for i, (name, heads) in enumerate(self.heads.items()):
            rows = (batch["task_index"] == i).nonzero().squeeze(1)  # [B_t]
            if rows.numel() == 0 and not self.training:
                continue
            out = heads(features, rows, labels, voted)
            outputs[name] = out
            if out.loss is not None:
                weighted = self.cfg.tasks[i].loss_weight * out.loss
                task_loss = weighted if task_loss is None else task_loss + weighted
        moes = fused.moe
        zero = fused.aux_loss.new_zeros(())

        def total(attr: str) -> torch.Tensor:
            return sum((getattr(o, attr) for o in moes), zero)

        return ModelOutput(
            tasks=outputs,
            pooled=fused.pooled,
            aux_loss=fused.aux_loss,
            task_loss=task_loss,
            loss=None if task_loss is None else task_loss + fused.aux_loss,
            balance_loss=total("balance_loss"),
            z_loss=total("z_loss"),
            local_entropy_loss=total("local_entropy_loss"),
            global_entropy_loss=total("global_entropy_loss"),
            tokens_per_expert=torch.stack([o.tokens_per_expert for o in moes]) if moes else None,
            modality_expert_counts=torch.stack([o.modality_expert_counts for o in moes]) if moes else None,
            dropped_tokens=sum((o.dropped_tokens for o in moes), torch.zeros((), dtype=torch.long)),
            routed_tokens=torch.tensor(int(mask.sum()) * len(moes) * self.cfg.fusion.top_k),
            token_mask=mask,
            modality_ids=modality_ids,
            moe_layers=moes,
        )


# ----------------------------------------------------------------------------------------------------------------
# builders


def build_encoders(cfg: EncodersConfig, arch_dir: str | Path | None = None) -> dict[str, ModalityEncoder]:
    """The configured encoders; with `arch_dir` (an exported model folder) each is built from the architecture
    saved in `arch_dir/<modality>/` with random init, ready for the exported state dict (each folder is checked
    first: a missing one is named, never handed on to transformers or timm)."""
    if arch_dir is None:
        return {m: enc_cfg.build() for m, enc_cfg in cfg.configured().items()}
    for m, enc_cfg in cfg.configured().items():
        enc_cfg.check_architecture_files(Path(arch_dir) / m)
    return {m: enc_cfg.build(Path(arch_dir) / m) for m, enc_cfg in cfg.configured().items()}


def build_model(cfg: ModelConfig, arch_dir: str | Path | None = None) -> MultimodalMoEModel:
    return MultimodalMoEModel(cfg, build_encoders(cfg.encoders, arch_dir))


def build_collator(model: MultimodalMoEModel, train: bool = False, seed: int = 0,
                   drop_modalities: tuple[str, ...] | list[str] = (), corrupt: Sequence[Corruption] = ()) -> Collator:
    """The collator that turns decoded samples into this model's batches (optionally without some modalities, or
    with some corrupted): each encoder's preprocessor, and every known modality's sample fields."""
    return Collator(
        task_names=list(model.task_names),
        vocabularies=[list(t.labels) for t in model.cfg.tasks],
        preprocessors={m: enc.preprocessor(train) for m, enc in model.encoders.items()},
        sample_fields=model.sample_fields,
        drop_modalities=tuple(drop_modalities),
        corrupt=tuple(corrupt),
        seed=seed,
    )
