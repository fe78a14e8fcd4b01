"""What a site holds: its partition of a dataset, split into few-shot training images and a
private test split (``loading``), and the bundled FedBiP-Shapes benchmark (``shapes``)."""
