"""Few-shot linear probes on frozen pre-logits, as in the ViT papers: k examples
per class, closed-form ridge regression to ±1 targets, accuracy on held-out data."""
from typing import Mapping, Sequence

import numpy as np


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int = 0) -> np.ndarray:
  """Indices of `shots` examples of every class (fewer where a class has fewer)."""
  rng = np.random.default_rng(seed)
  picks = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]
  return np.concatenate(picks)


def ridge_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, num_classes: int, l2: float = 1.0,
                   chunk: int = 1024) -> float:
  """Fits W = (X^T X + l2 I)^-1 X^T Y on standardised features (with a bias),
  Y = ±1 one-hot; returns the accuracy of argmax(X_test W). Memory grows with
  features x classes, never examples x classes (21,843 classes of ImageNet-21k:
  X^T Y from per-class sums, test scores in chunks of `chunk` examples)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  def design(x):
    x = (x - mean) / std
    return np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1).astype(np.float64)
  x = design(train_x)
  class_sums = np.zeros((num_classes, x.shape[1]))
  np.add.at(class_sums, train_y, x)
  xty = 2 * class_sums.T - x.sum(0)[:, None]  # X^T (2 one_hot(y) - 1)
  regulariser = l2 * np.eye(x.shape[1])
  regulariser[-1, -1] = 0.  # Do not shrink the bias.
  weights = np.linalg.solve(x.T @ x + regulariser, xty)
  correct = sum(int(np.sum(np.argmax(design(test_x[i:i + chunk]) @ weights, axis=1)
                           == test_y[i:i + chunk])) for i in range(0, len(test_x), chunk))
  return correct / len(test_x)


def fewshot_accuracies(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                       num_classes: int, shots: Sequence[int] = (1, 5, 10, 25),
                       seed: int = 0, l2: float = 1.0) -> Mapping[str, float]:
  """{'fewshot/K-shot': accuracy} for each K, probes fitted on K examples per class
  drawn from `train` (features, labels) and scored on all of `test`."""
  results = {}
  for k in shots:
    chosen = sample_shots(train[1], k, num_classes, seed)
    results[f'fewshot/{k}shot'] = ridge_accuracy(train[0][chosen], train[1][chosen],
                                                 test[0], test[1], num_classes, l2)
  return results
