"""bp-ollama: a Modelfile that speaks the model's own chat template, registered over Ollama's HTTP API."""
