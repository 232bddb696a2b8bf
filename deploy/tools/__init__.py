"""Host tools: the bundled example models, the demo, real-text corpora and the ARM emulation harness."""
