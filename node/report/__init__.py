"""Read-only reports over the store: usage metering (`ainode report usage`) and rule replay (`ainode replay`)."""
