"""The contract between encoders and conditioners: :class:`EncoderFeatures`.

Everything downstream of the frozen encoder works from an ``EncoderFeatures`` alone, so
features can come from a live VLM or from a cache on disk.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


class TokenRole(enum.IntEnum):
    """What a token in the encoder sequence is. Stored as int8 per token."""

    PAD = 0
    SYSTEM = 1  # system prompt and chat-template scaffolding
    USER_TEXT = 2  # the user's own words
    IMAGE_TILE = 3  # tokens of a local image tile
    THUMBNAIL = 4  # tokens of the global thumbnail (or the whole image when not tiled)
    GENERATED = 5  # tokens the VLM generated (VERIFI rewrite)

    @classmethod
    def parse(cls, names: Iterable[str | int | TokenRole]) -> tuple[TokenRole, ...]:
        out = []
        for name in names:
            if isinstance(name, (TokenRole, int)):
                out.append(cls(name))
                continue
            key = str(name).strip().upper().replace("-", "_").replace(" ", "_")
            if key not in cls.__members__:
                valid = ", ".join(m.lower() for m in cls.__members__ if m != "PAD")
                raise ValueError(f"Unknown token role {name!r}; valid roles are: {valid}")
            out.append(cls[key])
        return tuple(out)


#: The paper's default: the user's content plus every image token (VERIFI replaces
#: USER_TEXT by GENERATED, see :data:`VERIFI_ROLES`).
DEFAULT_ROLES: tuple[TokenRole, ...] = (TokenRole.USER_TEXT, TokenRole.IMAGE_TILE, TokenRole.THUMBNAIL)
VERIFI_ROLES: tuple[TokenRole, ...] = (TokenRole.GENERATED, TokenRole.IMAGE_TILE, TokenRole.THUMBNAIL)

#: What an encoder's ``roles`` option accepts: ``None``/``"default"`` (the paper's default,
#: :data:`DEFAULT_ROLES` or with VERIFI :data:`VERIFI_ROLES`), ``"all"`` (every real token)
#: or an explicit list of role names.
RolesSpec = str | Sequence[str | int | TokenRole] | None


def parse_roles_spec(spec: RolesSpec) -> str | tuple[TokenRole, ...]:
    """Validate an encoder's ``roles`` option: ``"default"``, ``"all"`` or a tuple of roles."""
    if spec is None:
        return "default"
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in ("default", "all"):
            return key
        spec = [spec]  # a single role name
    roles = TokenRole.parse(spec)
    if not roles:
        raise ValueError("roles must name at least one token role, or be 'default' or 'all'")
    if TokenRole.PAD in roles:
        raise ValueError("roles cannot include 'pad' (padding is never a real token)")
    return roles


def resolve_roles(spec: RolesSpec, verifi: bool) -> tuple[TokenRole, ...] | None:
    """The roles an encoder keeps for one call; ``None`` means every real token."""
    parsed = parse_roles_spec(spec)
    if parsed == "default":
        return VERIFI_ROLES if verifi else DEFAULT_ROLES
    if parsed == "all":
        return None
    return parsed  # type: ignore[return-value]


def roles_names(roles: tuple[TokenRole, ...] | None) -> list[str] | str:
    """JSON form of resolved roles (cache metadata): role names, or ``"all"``."""
    return "all" if roles is None else [r.name.lower() for r in roles]


@dataclass
class EncoderFeatures:
    """Per-token hidden states of the selected encoder layers.

    Attributes:
        hidden: ``(B, S, n, H)`` hidden states of the ``n`` tapped layers for every token.
        mask: ``(B, S)`` bool, True for real tokens, False for padding.
        roles: ``(B, S)`` int8 :class:`TokenRole` per token (``PAD`` on padding).
        layer_ids: absolute layer ids of the ``n`` taps (0 = embedding output, ``i`` =
            output of decoder block ``i``; see :mod:`unifusion.encoders.layers`).
        texts: optional per-sample text the DiT was conditioned on (e.g. VERIFI rewrite).
    """

    hidden: Tensor
    mask: Tensor
    roles: Tensor
    layer_ids: tuple[int, ...]
    texts: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.hidden.dim() != 4:
            raise ValueError(f"EncoderFeatures.hidden must be (B, S, n, H), got shape {tuple(self.hidden.shape)}")
        b, s, n, _ = self.hidden.shape
        if tuple(self.mask.shape) != (b, s):
            raise ValueError(f"EncoderFeatures.mask must be (B, S)=({b}, {s}), got {tuple(self.mask.shape)}")
        if tuple(self.roles.shape) != (b, s):
            raise ValueError(f"EncoderFeatures.roles must be (B, S)=({b}, {s}), got {tuple(self.roles.shape)}")
        self.layer_ids = tuple(int(i) for i in self.layer_ids)
        if len(self.layer_ids) != n:
            raise ValueError(f"EncoderFeatures has {n} tapped layers but {len(self.layer_ids)} layer_ids")
        self.mask = self.mask.bool()

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def seq_len(self) -> int:
        return self.hidden.shape[1]

    @property
    def num_layers(self) -> int:
        return self.hidden.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[3]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EncoderFeatures:
        """Move to ``device``; ``dtype`` applies to the hidden states only."""
        return replace(
            self,
            hidden=self.hidden.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            roles=self.roles.to(device=device),
        )

    def select_roles(self, roles: Sequence[TokenRole | str]) -> EncoderFeatures:
        """Keep only tokens whose role is in ``roles``, left-aligned and re-padded.

        The kept tokens keep their order; the result's sequence length is the largest
        number of kept tokens in the batch (at least 1, so an empty prompt still yields
        a fully masked sequence rather than a zero-size tensor).
        """
        return self.gather_tokens(self.role_mask(roles))

    def role_mask(self, roles: Sequence[TokenRole | str]) -> Tensor:
        """``(B, S)`` bool: real tokens whose role is in ``roles``."""
        wanted = torch.tensor([int(r) for r in TokenRole.parse(roles)], device=self.roles.device)
        return torch.isin(self.roles.long(), wanted) & self.mask

    def select_layers(self, layer_ids: Sequence[int]) -> EncoderFeatures:
        """Keep only the taps with the given absolute layer ids (in the given order)."""
        missing = [i for i in layer_ids if i not in self.layer_ids]
        if missing:
            raise ValueError(f"Layers {missing} were not tapped; available layer ids: {list(self.layer_ids)}")
        idx = [self.layer_ids.index(i) for i in layer_ids]
        return replace(self, hidden=self.hidden[:, :, idx], layer_ids=tuple(layer_ids))

    def gather_tokens(self, keep: Tensor) -> EncoderFeatures:
        """Left-align the tokens where ``keep`` (B, S) is True; pad the rest."""
        b = self.batch_size
        counts = keep.sum(1)
        s_new = max(int(counts.max().item()) if b else 0, 1)
        # stable sort puts kept tokens first while preserving their order
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :s_new]
        hidden = torch.gather(self.hidden, 1, order[:, :, None, None].expand(-1, -1, *self.hidden.shape[2:]))
        new_mask = torch.arange(s_new, device=keep.device)[None, :] < counts[:, None]
        roles = torch.gather(self.roles, 1, order)
        hidden = hidden * new_mask[:, :, None, None].to(hidden.dtype)
        roles = torch.where(new_mask, roles, torch.zeros_like(roles))
        return replace(self, hidden=hidden, mask=new_mask, roles=roles)

    @staticmethod
    def collate(items: Sequence[EncoderFeatures]) -> EncoderFeatures:
        """Concatenate along the batch, right-padding to the longest sequence."""
        if not items:
            raise ValueError("cannot collate an empty list of EncoderFeatures")
        ids = items[0].layer_ids
        for it in items[1:]:
            if it.layer_ids != ids:
                raise ValueError(f"cannot collate features with different layer ids: {ids} vs {it.layer_ids}")
        s = max(it.seq_len for it in items)
        texts = None
        if any(it.texts is not None for it in items):
            texts = [t for it in items for t in (it.texts or [""] * it.batch_size)]
        first = items[0]
        b = sum(it.batch_size for it in items)
        if any(it.hidden.dtype != first.hidden.dtype or it.hidden.device != first.hidden.device for it in items):
            raise ValueError("cannot collate features of different dtypes or devices; convert them with .to() first")
        # one allocation and a slice copy per item: a data loader collates a batch of
        # one-sample features every step, and per-item padding + cat cost more than the copy
        hidden = first.hidden.new_zeros((b, s, *first.hidden.shape[2:]))
        mask = torch.zeros((b, s), dtype=torch.bool, device=first.mask.device)
        roles = torch.zeros((b, s), dtype=first.roles.dtype, device=first.roles.device)
        row = 0
        for it in items:
            n, sl = it.batch_size, it.seq_len
            hidden[row : row + n, :sl] = it.hidden
            mask[row : row + n, :sl] = it.mask
            roles[row : row + n, :sl] = it.roles
            row += n
        return EncoderFeatures(hidden=hidden, mask=mask, roles=roles, layer_ids=ids, texts=texts)


@dataclass(frozen=True)
class EncoderSpec:
    """What a conditioner may rely on about the encoder, known without loading weights."""

    hidden_size: int
    layer_ids: tuple[int, ...]
    depth: int  # number of decoder blocks of the language model
    num_heads: int = 0
    head_dim: int = 0
    name: str = ""

    @property
    def num_taps(self) -> int:
        return len(self.layer_ids)
