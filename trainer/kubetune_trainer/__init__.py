"""kubetune's containers: the packed QLoRA SFT trainer (``sft``) and the adapter merge (``merge``)."""
