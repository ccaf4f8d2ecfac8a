"""Runnable lessons on what happens inside a classifier, one idea per file, each readable top to bottom.

Each lesson imports only torch, numpy, matplotlib and the standard library (nothing else from Ursa),
takes its data as arrays, returns a small result with its numbers (`columns`, `rows()`, `notice`), and
draws its picture when given `out=`. The CLI runs them as `ursa lesson <name>`; the notebook
`notebooks/lesson2.ipynb` walks through all of them.

- `sgd`: gradient descent from scratch on y = x @ a, animated (GIF and HTML);
- `minibatch`: full-batch vs mini-batch SGD, loss against steps and against seconds;
- `lr`: the same training with a too-high, a good and a too-low learning rate;
- `epochs`: many epochs on few, noisy labels, where validation loss turns up (overfitting);
- `fit`: under-, well- and over-fitted polynomials with training and validation points;
- `predict`: softmax probabilities, argmax and the error rate, by hand.

The submodules are imported on use (`from ursa.lessons.sgd import sgd_lesson`), so importing this
package stays cheap.
"""

from __future__ import annotations

__all__ = ["sgd", "minibatch", "lr", "epochs", "fit", "predict"]
