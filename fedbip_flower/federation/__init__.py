"""The Flower side: the one upload and its validation (``payload``), what a ClientApp does
(``client``), the one-shot strategy (``strategy``), the server pipeline shared with the
benchmark (``server_pipeline``) and the ServerApp main (``server``)."""
