"""ringserve's router: one OpenAI endpoint in front of many engine replicas (`python -m router`)."""
