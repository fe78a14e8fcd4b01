"""The FedBiP algorithm, free of Flower: prompt layout and concept injection
(``embeddings``, ``concepts``), bi-level personalization on a client (``personalize``) and
synthesis on the server (``synthesize``, ``pipeline``)."""
