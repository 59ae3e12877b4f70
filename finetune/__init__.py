"""Transfer (BEiT v2 stage 3): classification fine-tuning with layer-wise lr decay, linear probing and k-NN.

Stable API: `build_classifier(arch, num_classes, checkpoint=None)` returns a classifier in the fine-tune layout from
any backbone checkpoint route (ours, official pretrained or fine-tuned, timm, exported); `load_classifier(path)`
reads a fine-tune run's `classifier.pt`. CLI: `python -m finetune.classify {train,evaluate,linear_probe,knn} --help`.
"""
from finetune.model import CLS_ARCHS, BeitClassifier, build_classifier, load_classifier, save_classifier

__all__ = ["CLS_ARCHS", "BeitClassifier", "build_classifier", "load_classifier", "save_classifier"]
