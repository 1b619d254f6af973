"""The multimodal MoE fusion model, top to bottom:

    per modality: encoder -> tokens [B, T_m, D_enc] + mask -> Linear to d_model + learned modality embedding
    concatenate [fusion token; text; image; audio] -> FusionStack (attention + SparseMoE blocks) -> pooled [B, D]
    per task: VotingHeads -> ensemble answer, per-head votes, agreement

A modality a sample lacks adds no tokens (its rows are masked out, and the encoder runs only on the samples that
have it). The batch format is documented in `moefuse.datasets.collate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moefuse.configutil import ConfigError, check
from moefuse.datasets.collate import Collator
from moefuse.encoders import (
    AudioEncoderConfig,
    ImageEncoderConfig,
    TextEncoderConfig,
    build_audio_encoder,
    build_image_encoder,
    build_text_encoder,
)
from moefuse.fusion.heads import HeadsConfig, TaskConfig, TaskOutput, VotingHeads
from moefuse.fusion.moe import MoEOutput
from moefuse.fusion.stack import FusionConfig, FusionStack

MODALITIES = ("text", "image", "audio")
FUSION_TOKEN = len(MODALITIES)  # modality id of the learned fusion token (row 3 of the routing stats)
ROUTING_ROWS = (*MODALITIES, "fusion")


@dataclass
class EncodersConfig:
    text: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    """Text encoder (BERT); null = the model takes no text."""
    image: ImageEncoderConfig | None = field(default_factory=ImageEncoderConfig)
    """Image encoder (timm ViT); null = the model takes no images."""
    audio: AudioEncoderConfig | None = field(default_factory=AudioEncoderConfig)
    """Audio encoder (wav2vec2); null = the model takes no audio."""

    def __post_init__(self) -> None:
        check(any(getattr(self, m) is not None for m in MODALITIES), "encoders",
              "at least one of text, image, audio must be configured")


@dataclass
class ModelConfig:
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    """Which modalities the model takes, and how each is encoded."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """The shared fusion stack."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """Voting heads per task."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Tasks with their vocabularies (filled from dataset.json before the model is built)."""

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        check(len(set(names)) == len(names), "tasks", f"task names must be unique, got {names}")


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
    modality_expert_counts: torch.Tensor | None  # [L, M + 1, E] rows: text, image, audio, fusion token
    dropped_tokens: torch.Tensor  # scalar, over all layers
    routed_tokens: torch.Tensor  # scalar: real tokens x layers x top_k (the denominator of the dropped fraction)
    token_mask: torch.Tensor  # [B, T] real tokens of the fused sequence
    modality_ids: torch.Tensor  # [B, T] 0 text, 1 image, 2 audio, 3 fusion token
    moe_layers: list[MoEOutput]  # per MoE layer: routing of the real tokens in [B, T] row-major order


class MultimodalMoEModel(nn.Module):
    def __init__(self, cfg: ModelConfig, encoders: dict[str, nn.Module]):
        super().__init__()
        if not cfg.tasks:
            raise ConfigError("tasks: the model needs at least one task with its labels")
        for t in cfg.tasks:
            if not t.labels:
                raise ConfigError(f"tasks.{t.name}.labels: empty; fill it from the shards' dataset.json first")
        self.cfg = cfg
        d = cfg.fusion.d_model
        self.encoders = nn.ModuleDict(encoders)
        self.project = nn.ModuleDict({m: nn.Linear(enc.out_dim, d) for m, enc in encoders.items()})
        self.modality_embed = nn.Embedding(len(MODALITIES) + 1, d)  # + the fusion token's
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.fusion_token, std=0.02)
        self.fusion = FusionStack(cfg.fusion, num_modalities=len(ROUTING_ROWS))
        self.heads = nn.ModuleDict({t.name: VotingHeads(d, len(t.labels), cfg.heads) for t in cfg.tasks})
        self.task_names = [t.name for t in cfg.tasks]

    # -- inputs ---------------------------------------------------------------------------------------------

    def _drop_modalities(self, present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Modality dropout: drop each present modality with prob p, but never all of a sample's modalities."""
        p = self.cfg.fusion.modality_dropout
        stacked = torch.stack([present[m] for m in present], dim=1)  # [B, M]
        drop = (torch.rand(stacked.shape, device=stacked.device) < p) & stacked
        keep = stacked & ~drop
        none_left = ~keep.any(1)
        keep[none_left] = stacked[none_left]  # a sample that would lose everything keeps what it had
        return {m: keep[:, i] for i, m in enumerate(present)}

    def _encoder_inputs(self, modality: str, batch: dict, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        if modality == "text":
            return {k: v.index_select(0, rows) for k, v in batch["text"].items()}
        if modality == "image":
            return {"pixel_values": batch["image"].index_select(0, rows)}
        return {"input_values": batch["audio"].index_select(0, rows),
                "sample_mask": batch["audio_mask"].index_select(0, rows)}

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode every present modality -> tokens [B, T, D], mask [B, T], modality_ids [B, T]."""
        b = batch["task_index"].shape[0]
        for m in MODALITIES:
            if m not in self.encoders and bool(batch[f"{m}_present"].any()):
                raise ConfigError(f"the batch has {m} but the model has no {m} encoder (encoders.{m} is null)")
        present = {m: batch[f"{m}_present"].bool() for m in self.encoders}
        if self.training and self.cfg.fusion.modality_dropout > 0:
            present = self._drop_modalities(present)
        device = self.fusion_token.device
        parts = [self.fusion_token.expand(b, -1, -1) + self.modality_embed.weight[FUSION_TOKEN]]  # [B, 1, D]
        masks = [torch.ones(b, 1, dtype=torch.bool, device=device)]
        ids = [torch.full((b, 1), FUSION_TOKEN, device=device)]
        for m, encoder in self.encoders.items():
            rows = present[m].nonzero().squeeze(1)  # [B_m]: only the samples that have this modality
            if rows.numel() == 0:
                continue
            enc = encoder(**self._encoder_inputs(m, batch, rows))
            tok = self.project[m](enc.tokens) + self.modality_embed.weight[MODALITIES.index(m)]  # [B_m, T_m, D]
            full = tok.new_zeros(b, tok.shape[1], tok.shape[2]).index_copy(0, rows, tok)  # [B, T_m, D]
            mask = torch.zeros(b, tok.shape[1], dtype=torch.bool, device=device).index_copy(0, rows, enc.mask)
            parts.append(full)
            masks.append(mask)
            ids.append(torch.full(mask.shape, MODALITIES.index(m), device=device))
        return torch.cat(parts, 1), torch.cat(masks, 1), torch.cat(ids, 1)  # [B, T, D], [B, T], [B, T]

    # -- forward --------------------------------------------------------------------------------------------

    def forward(self, batch: dict) -> ModelOutput:
        tokens, mask, modality_ids = self.embed(batch)
        fused = self.fusion(tokens, mask, modality_ids)
        labels = batch.get("labels")
        outputs: dict[str, TaskOutput] = {}
        task_loss = None
        for i, (name, heads) in enumerate(self.heads.items()):
            rows = (batch["task_index"] == i).nonzero().squeeze(1)  # [B_t]
            if rows.numel() == 0 and not self.training:
                continue
            out = heads(fused.pooled, rows, labels)
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


def build_encoders(cfg: EncodersConfig, arch_dir: str | Path | None = None) -> dict[str, nn.Module]:
    """The configured encoders; with `arch_dir` (an exported model folder) each is built from the architecture
    saved in `arch_dir/<modality>/` with random init, ready for the exported state dict."""
    builders = {"text": build_text_encoder, "image": build_image_encoder, "audio": build_audio_encoder}
    return {m: builders[m](getattr(cfg, m), **({"arch_dir": Path(arch_dir) / m} if arch_dir else {}))
            for m in MODALITIES if getattr(cfg, m) is not None}


def build_model(cfg: ModelConfig, arch_dir: str | Path | None = None) -> MultimodalMoEModel:
    return MultimodalMoEModel(cfg, build_encoders(cfg.encoders, arch_dir))


def build_collator(model: MultimodalMoEModel, train: bool = False, seed: int = 0,
                   drop_modalities: tuple[str, ...] | list[str] = ()) -> Collator:
    """The collator that turns decoded samples into this model's batches (optionally without some modalities)."""
    enc = model.encoders
    text, image, audio = enc["text"] if "text" in enc else None, enc["image"] if "image" in enc else None, \
        enc["audio"] if "audio" in enc else None
    return Collator(
        task_names=list(model.task_names),
        vocabularies=[list(t.labels) for t in model.cfg.tasks],
        tokenizer=text.tokenizer if text is not None else None,
        text_max_length=text.cfg.max_length if text is not None else 64,
        image_transform=image.transform if image is not None else None,
        image_size=tuple(image.data_config["input_size"]) if image is not None else None,
        audio_max_samples=audio.cfg.max_samples if audio is not None else None,
        random_crop=train,
        seed=seed,
        drop_modalities=tuple(drop_modalities),
    )
