"""Chat data: reading, templating with loss masks, draft-vocabulary selection, prepared datasets."""
