"""Server side of Flower's SecAgg+ for synchronous rounds (`secure-aggregation = secaggplus`).

SecAgg+ is a workflow of Flower's legacy API: `DefaultWorkflow` with a
`SecAggPlusWorkflow` fit stage drives a legacy `Strategy` through a
`LegacyContext`. Clients return dense float deltas; the workflow unmasks only
their example-weighted mean and hands it to `aggregate_fit`, which here adds
it to the global adapter. The server never sees one client's delta.

What combines with it: the clients' deltas go through SecAgg+'s own
quantization (`secagg-clipping-range`, `secagg-quantization-range`), so the
update codec (top-k, int8, zstd) and the sealed envelope do not apply on this
path: masking needs dense vectors the server can add, and the pairwise masks
already hide each update. The global adapter goes down as float32 parameters.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from edgefed.common.config import EdgefedConfig
from edgefed.common.wire.codec import Adapter
from edgefed.common.wire.messages import BASE_FINGERPRINT, SERVER_ROUND

log = logging.getLogger(__name__)


class DeltaMeanStrategy(LegacyFedAvg):
    """Legacy FedAvg whose `aggregate_fit` receives the unmasked mean delta and applies it."""

    def __init__(self, initial: Adapter, recorder, cfg: EdgefedConfig, fingerprint: str,  # noqa: ANN001
                 announcement: Callable[[], dict[str, object]] | None = None) -> None:
        self.names = list(initial)
        self.global_arrays = [t.detach().numpy().astype(np.float32) for t in initial.values()]
        self.recorder = recorder
        self.round_stats: dict = {}
        run_config = {**cfg.to_run_config(), BASE_FINGERPRINT: fingerprint}
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,  # the clients' evaluation speaks the message API, not legacy EvaluateIns
            min_fit_clients=cfg.min_clients,
            min_available_clients=cfg.min_clients,
            min_evaluate_clients=0,
            initial_parameters=ndarrays_to_parameters(self.global_arrays),
            # the announcement tells a device where to fetch a base of checkpoint encoders (and the newest model)
            on_fit_config_fn=lambda server_round: {**run_config, **(announcement() if announcement else {}),
                                                   SERVER_ROUND: server_round},
            evaluate_fn=self._after_round,
        )

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.round_stats = {"clients": len(results), "failures": len(failures)}
        if not results:
            log.warning("round %d: no SecAgg+ result; the global adapter is unchanged", server_round)
            return None, {}
        # every result carries the same unmasked mean (the workflow's convention)
        mean_delta = parameters_to_ndarrays(results[0][1].parameters)
        candidate = [g + d.astype(np.float32) for g, d in zip(self.global_arrays, mean_delta)]
        if not all(np.isfinite(a).all() for a in candidate):  # never publish a non-finite global
            log.error("round %d: the unmasked mean is not finite; the global adapter is unchanged", server_round)
            return None, {}
        self.global_arrays = candidate
        losses = [(r.num_examples, r.metrics.get("train-loss", float("nan"))) for _, r in results]
        total = sum(n for n, _ in losses)
        self.round_stats["train_loss"] = sum(n * float(v) for n, v in losses) / max(total, 1)
        self.round_stats["bytes_sent"] = sum(a.nbytes for a in self.global_arrays) * len(results)
        return ndarrays_to_parameters(self.global_arrays), {}

    def adapter(self) -> Adapter:
        return OrderedDict((n, torch.from_numpy(a.copy())) for n, a in zip(self.names, self.global_arrays))

    def _after_round(self, server_round: int, arrays: list[np.ndarray], config: dict) -> tuple[float, dict] | None:
        if server_round == 0:
            return None
        metrics = self.recorder.record(server_round, self.adapter(), {**self.round_stats, "version": server_round})
        return float(metrics["loss"]), {"accuracy": float(metrics["accuracy"])}


def run_secaggplus(
    grid: Grid, context: Context, cfg: EdgefedConfig, initial: Adapter, fingerprint: str,
    recorder,  # noqa: ANN001 - edgefed.cloud.server_app.RoundRecorder
    announcement: Callable[[], dict[str, object]] | None = None,
) -> Adapter:
    """Run cfg.num_rounds of SecAgg+ FedAvg; returns the final adapter. `announcement`: entries for each round's
    config (ModelRollout.announcement)."""
    strategy = DeltaMeanStrategy(initial, recorder, cfg, fingerprint, announcement)
    shares = max(2, cfg.min_clients)
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=max(2, (shares * 2 + 2) // 3),
            clipping_range=cfg.secagg_clipping_range,
            quantization_range=cfg.secagg_quantization_range,
        )
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_rounds), strategy=strategy)
    log.info("SecAgg+ over %d rounds, %d shares", cfg.num_rounds, shares)
    workflow(grid, legacy)
    return strategy.adapter()
