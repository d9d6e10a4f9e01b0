"""The ClientApp of the simulation: the edge ClientApp plus simulated device behaviour.

Same train and evaluate handlers as the deployed edge app (edge/client_app.py);
`device_profile_mod` adds the compute speed, bandwidth and dropout of the
node's simulated device (simulations/device_profiles.py).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from edgefed.edge.client_app import evaluate, train
from edgefed.edge.secure_aggregation import secure_aggregation_mod
from edgefed.simulations.device_profiles import device_profile_mod

app = ClientApp(mods=[device_profile_mod, secure_aggregation_mod])
app.train()(train)
app.evaluate()(evaluate)
