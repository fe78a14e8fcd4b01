"""FedBiP ClientApp package."""
