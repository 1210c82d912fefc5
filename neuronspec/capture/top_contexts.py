"""Each neuron's top-activating contexts, streamed: the k largest activations of the ``mlp``
site per neuron, with the token position of each (evidence for a neuron card, in the
manner of Neuroscope's max-activating examples).

Fixed size and mergeable: per layer ``top_value (k, W)`` float32 (descending per neuron)
and ``top_index (k, W)`` int64, the corpus token index ``window · T + position`` of each
(``window`` counted over the analysis windows of the whole corpus, so shards and ranks
carry their offset). Empty slots hold ``-inf`` and index -1. Order, and the tie rule that
makes the selection unique: larger value first, equal values by smaller token index. A
merge concatenates the candidates and keeps the first k in that order, so shards merged
equal the whole corpus exactly, and so does every batch added to the running top k.
"""

from __future__ import annotations

import torch

EMPTY_INDEX = -1


def empty_top(k: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_value, top_index)`` with every slot empty: ``(k, W)`` each."""
    return (
        torch.full((k, width), float("-inf"), dtype=torch.float32),
        torch.full((k, width), EMPTY_INDEX, dtype=torch.long),
    )


def select_top(
    values: torch.Tensor, index: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` rows per column of candidates ``(n, W)`` in the order of the module
    docstring (value descending, ties by index ascending); ``n >= k``."""
    by_index = torch.argsort(index, dim=0, stable=True)
    values, index = values.gather(0, by_index), index.gather(0, by_index)
    by_value = torch.argsort(values, dim=0, descending=True, stable=True)[:k]
    return values.gather(0, by_value), index.gather(0, by_value)


def batch_top(act: torch.Tensor, k: int, first_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of one batch ``act (B, T, W)``: ``(k, W)`` values and token indices
    ``first_token + b·T + t``. ``torch.topk`` picks the candidates; a column whose k-th
    value is tied with a value it left out is selected again among all its values at or
    above that value, so the tie rule holds exactly."""
    batch, window, width = act.shape
    x = act.detach().reshape(batch * window, width).float()  # (B·T, W)
    if batch * window < k:  # fewer positions than slots: pad with empty candidates
        pad_value, pad_index = empty_top(k - batch * window, width)
        flat = torch.arange(batch * window, device=x.device)[:, None].expand(-1, width)
        values = torch.cat([x.cpu(), pad_value])
        index = torch.cat([flat.cpu() + first_token, pad_index])
        return select_top(values, index, k)
    values, rows = torch.topk(x, k, dim=0)  # (k, W) each
    kth = values[-1]  # (W,)
    tied = torch.nonzero((x >= kth).sum(0) > k).flatten()  # columns with a tie at the edge
    values, rows = values.cpu(), rows.cpu()
    for column in tied.tolist():
        (candidates,) = torch.nonzero(x[:, column] >= kth[column], as_tuple=True)
        chosen_values, chosen_rows = select_top(
            x[candidates, column].cpu()[:, None], candidates.cpu()[:, None], k
        )
        values[:, column], rows[:, column] = chosen_values[:, 0], chosen_rows[:, 0]
    return select_top(values, rows + first_token, k)


def merge_top(
    parts: list[tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of several ``(top_value, top_index)`` pairs of one layer."""
    values = torch.cat([value for value, _ in parts])
    index = torch.cat([index for _, index in parts])
    return select_top(values, index, k)
