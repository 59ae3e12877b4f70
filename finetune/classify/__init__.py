"""Classification transfer: fine-tuning with layer-wise lr decay (`train`), held-out top-1/top-5 (`evaluate`), linear
probing and k-NN on frozen features (`probe`), and the fine-tuned classifier's export (`export`). Commands:
`python -m finetune.classify` or `beitv2 classify`."""
