"""FedBiP ServerApp package."""
