"""Tables, sessions and the job state machine. The only package that writes job status."""
