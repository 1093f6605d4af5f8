"""The serving front end: an OpenAI-compatible HTTP server over the continuous-batching engine,
and a load generator (`masep bench serve`) for any OpenAI-compatible endpoint."""
