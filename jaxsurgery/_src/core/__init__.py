"""The core: feature specs, packed masks, the values and interpreter, and the table they build."""
