"""An OpenAI-compatible API under /openai/v1: embeddings, models, files and batches.

- `errors`: OpenAI's error body and status codes, for these routes only;
- `embeddings`: request parsing, the model lookup, the response shape (shared by batches);
- `batches`: input-file validation, turning lines into jobs, writing output and error files;
- `routes`: the HTTP routes.
"""
