"""The Twin-Merging router: an MLP d → 2d → 2d → T on the shared model's mean-pooled last
hidden state, trained with cross-entropy to name the task of an input; w = softmax(logits)
(Lu et al., NeurIPS 2024, arXiv 2406.15479, as in the reference code LZY-the-boys/Twin-Merging).
"""

from __future__ import annotations

import torch

ROUTER_EPOCHS = 200
ROUTER_LR = 1e-3


class Router(torch.nn.Module):
    """Task logits of pooled features: Linear(d, 2d), ReLU, Linear(2d, 2d), ReLU, Linear(2d, T)."""

    def __init__(self, hidden: int, tasks: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(hidden, 2 * hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(2 * hidden, 2 * hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(2 * hidden, tasks),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """Routing weights w = softmax(logits), one row per input, each row summing to 1."""
        return torch.softmax(self(features.float()), dim=-1)


def train_router(
    features: torch.Tensor,
    tasks: torch.Tensor,
    n_tasks: int,
    *,
    epochs: int = ROUTER_EPOCHS,
    lr: float = ROUTER_LR,
    seed: int = 0,
) -> Router:
    """A router fitted (full-batch Adam, cross-entropy) to map ``features`` (N, d) to their
    task indices ``tasks`` (N,); deterministic for a given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        router = Router(features.shape[1], n_tasks)
    x = features.float()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(router((x - mu) / sd), tasks)
        loss.backward()
        opt.step()
    _fold_standardisation(router, mu, sd)
    return router.eval()


@torch.no_grad()
def _fold_standardisation(router: Router, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Fold (x − μ)/σ into the first layer, so the router takes raw features."""
    first = router.net[0]
    assert isinstance(first, torch.nn.Linear)
    first.bias -= first.weight @ (mu / sd)
    first.weight /= sd
