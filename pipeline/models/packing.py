"""Padding-free forward passes, with each pair's prompt computed once for both responses.

A collated batch of B pairs is 2B right-padded rows (2B, T), chosen rows first,
and each pair's prompt appears twice. Packing lays it out anew:

    unit of pair i:  [prompt | chosen response | rejected response]
    rows:            units end to end: one row of exactly their tokens when that is at most
                     1024 wide, else first-fit decreasing in rows of 1024 (or the longest unit)

with an explicit attention mask: a token attends to earlier tokens of its own
unit only, and a response never to the other response. Position ids are the
tokens' positions in their own sequence (the rejected response starts where the
prompt ends, as in the padded row). Every response token then sees exactly the
context it sees padded, so the logits equal the padded forward's up to float
rounding; :func:`packing_supported` checks that on the model itself, and a model
that fails (one that ignores a 4-D mask, say) runs padded. Rows that are not
pairs with a shared prompt (the second half's prompt differs) are units of
their own.

On the offline default (SmolLM2, batch 4 pairs, T = 64, prompts <= 16 tokens)
this cuts the positions a step computes from about 460 (padded to each batch's
longest row) to about 280, and a policy forward and backward from 2.54 s to
1.85 s on 2 CPU cores (docs/performance.md has the command). Sliding-window
models run padded: a 4-D mask would bypass their window. Filler positions cost as much as real
ones, which is why one exact-width row beats fixed-width bins.

Layout, added to a collated batch by :func:`pack_batch` on the host, before the
batch moves to its device (no device sync):
    packed_input_ids      (R, W)    the units end to end; filler token 0 after the last
    packed_position_ids   (R, W)    each token's position in its sequence
    packed_attention_mask (R, 1, W, W) bool, True where query token q may attend key token k
    packed_slots          (2B, T)   where token (i, t) of the padded batch sits in the
                                    flattened (R * W) layout; -1 on padding
"""

from __future__ import annotations

import logging
import weakref

import torch

from pipeline.tokenstats import IGNORE_INDEX

log = logging.getLogger(__name__)

KEYS = ("packed_input_ids", "packed_position_ids", "packed_attention_mask", "packed_slots")
MAX_WIDTH = 1024
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch of a token within its unit; PROMPT is seen by both


def pack_batch(batch: dict[str, torch.Tensor], width: int | None = None, max_width: int = MAX_WIDTH
               ) -> dict[str, torch.Tensor]:
    """``batch`` plus its packed layout (see the module docstring); rows must be right-padded.

    ``width``: tokens per packed row (at least the longest unit). By default, one row holding
    exactly every unit when they total at most ``max_width`` tokens, else rows of ``max_width``:
    attention over a row costs its width squared, filler costs as much as a real token.
    """
    attention_mask = batch["attention_mask"]
    rows, padded_width = attention_mask.shape
    lengths = attention_mask.sum(dim=1)  # (S,)
    if not torch.equal(attention_mask.bool(), torch.arange(padded_width) < lengths.unsqueeze(1)):
        raise ValueError("packing needs right-padded rows (real tokens first, then padding)")
    units = _units(batch, lengths.tolist())
    total = sum(u.length for u in units)
    width = max(width or (total if total <= max_width else max_width), max(u.length for u in units))
    bin_of, start_of = _first_fit_decreasing([u.length for u in units], width)
    used = max(bin_of) + 1
    ids = torch.zeros(used * width, dtype=batch["input_ids"].dtype)
    positions = torch.arange(used * width).remainder(width)
    group = -1 - torch.arange(used * width)  # filler: a group of its own per token, attends to itself only
    branch = torch.zeros(used * width, dtype=torch.long)
    slots = torch.full((rows, padded_width), -1, dtype=torch.long)
    for n, (unit, b, start) in enumerate(zip(units, bin_of, start_of, strict=True)):
        base = b * width + start
        for row, offset, first, last, kind in unit.pieces:  # tokens [first, last) of padded row `row`
            dest = torch.arange(base + offset, base + offset + last - first)
            ids[dest] = batch["input_ids"][row, first:last]
            positions[dest] = torch.arange(first, last)
            group[dest] = n
            branch[dest] = kind
        for row, row_slots in unit.slots(base):
            slots[row, : row_slots.numel()] = row_slots
    shape = (used, width)
    group, branch, positions = group.view(shape), branch.view(shape), positions.view(shape)
    allowed = ((group.unsqueeze(2) == group.unsqueeze(1))
               & (positions.unsqueeze(1) <= positions.unsqueeze(2))
               & ((branch.unsqueeze(1) == PROMPT) | (branch.unsqueeze(1) == branch.unsqueeze(2))))  # (R, W, W)
    return {**batch, "packed_input_ids": ids.view(shape), "packed_position_ids": positions,
            "packed_attention_mask": allowed.unsqueeze(1), "packed_slots": slots}


class _Unit:
    """One pair laid out as prompt, chosen, rejected, or one lone row.

    pieces: (padded row, offset in the unit, first token, end token, branch) copied into the unit
    """

    def __init__(self, pieces: list[tuple[int, int, int, int, int]], rows: list[tuple[int, list[int]]]):
        self.pieces = pieces
        self._rows = rows  # (padded row, offset in the unit of each of its tokens)
        self.length = sum(last - first for _, _, first, last, _ in pieces)

    def slots(self, base: int):  # noqa: ANN201
        for row, offsets in self._rows:
            yield row, base + torch.tensor(offsets, dtype=torch.long)


def _units(batch: dict[str, torch.Tensor], lengths: list[int]) -> list[_Unit]:
    """Pairs (row i and row i + S/2 with the same prompt) share one unit; other rows are units alone."""
    rows = len(lengths)
    half = rows // 2
    labels = batch.get("labels")
    units, paired = [], set()
    if labels is not None and rows % 2 == 0:
        response = labels != IGNORE_INDEX
        # The prompt is everything before a row's first response token.
        starts = torch.where(response.any(dim=1), response.float().argmax(dim=1), torch.tensor(lengths)).tolist()
        ids = batch["input_ids"]
        for c in range(half):
            r, p = c + half, starts[c]
            if p == 0 or starts[r] != p or not torch.equal(ids[c, :p], ids[r, :p]):
                continue
            lc, lr = lengths[c] - p, lengths[r] - p
            pieces = [(c, 0, 0, p, PROMPT), (c, p, p, p + lc, CHOSEN), (r, p + lc, p, p + lr, REJECTED)]
            row_offsets = [(c, list(range(p + lc))), (r, list(range(p)) + list(range(p + lc, p + lc + lr)))]
            units.append(_Unit(pieces, row_offsets))
            paired.update((c, r))
    for row in range(rows):
        if row not in paired:
            units.append(_Unit([(row, 0, 0, lengths[row], PROMPT)], [(row, list(range(lengths[row])))]))
    return units


def _first_fit_decreasing(lengths: list[int], width: int) -> tuple[list[int], list[int]]:
    """(bin, offset in the bin) of each unit; bins hold ``width`` tokens, longest units placed first."""
    fill: list[int] = []
    bin_of, start_of = [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, used in enumerate(fill) if used + lengths[i] <= width), len(fill))
        if b == len(fill):
            fill.append(0)
        bin_of[i], start_of[i] = b, fill[b]
        fill[b] += lengths[i]
    return bin_of, start_of


def packed_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Model keyword arguments of a packed batch: ids, position ids and an additive float mask in
    ``dtype`` (0 where allowed, the dtype's minimum elsewhere; what eager and SDPA attention both take)."""
    allowed = batch["packed_attention_mask"]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": batch["packed_input_ids"], "position_ids": batch["packed_position_ids"],
            "attention_mask": mask}


def packed_hidden_index(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(N,) indices into the flattened (R * W) packed layout of the N response positions ``mask`` (2B, T-1) selects."""
    return batch["packed_slots"][:, :-1][mask]


_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def packing_supported(model: torch.nn.Module) -> bool:
    """True when ``model`` gives the same logits packed as padded (it honours a 4-D attention mask and
    position ids). One pair with a shared prompt and one lone row, each way, in eval mode; once per model."""
    if model not in _CHECKED:
        _CHECKED[model] = _check_packing(model)
    return _CHECKED[model]


@torch.no_grad()
def _check_packing(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        # transformers hands a 4-D mask to sliding-window layers as it is: packed attention would
        # ignore the window, and the check's short sequences could not tell.
        log.warning("%s uses sliding-window attention: training padded", type(model).__name__)
        return False
    training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        embeddings = model.get_input_embeddings()
        vocab, dtype = embeddings.num_embeddings, embeddings.weight.dtype
        ids = torch.tensor([[3, 5, 7, 11, 13, 0], [29, 31, 0, 0, 0, 0],
                            [3, 5, 17, 19, 0, 0], [37, 41, 43, 47, 53, 59]]).remainder(vocab)
        lengths = torch.tensor([5, 2, 4, 6])
        mask = (torch.arange(6) < lengths.unsqueeze(1)).long()
        labels = torch.where(torch.arange(6) >= 2, ids, IGNORE_INDEX).masked_fill(mask == 0, IGNORE_INDEX)
        batch = pack_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, width=16)
        batch = {k: v.to(device) for k, v in batch.items()}
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        packed = model(**packed_inputs(batch, dtype), use_cache=False).logits  # the dtype training uses
        real = batch["attention_mask"].bool()
        expected = padded[real].float()
        got = packed.reshape(-1, packed.shape[-1])[batch["packed_slots"][real]].float()
        tolerance = 1e-3 if padded.dtype in (torch.float32, torch.float64) else 5e-2
        same = bool(torch.allclose(got, expected, rtol=tolerance, atol=tolerance * (1 + float(expected.abs().max()))))
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:  # no position ids / 4-D masks
        log.warning("packing check failed on %s (%s): training padded", type(model).__name__, error)
        return False
    finally:
        model.train(training)
    if not same:
        log.warning("%s attends across packed sequences: training padded", type(model).__name__)
    return same
