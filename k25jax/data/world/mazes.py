"""Mazes domain: perfect grid mazes (always solvable, unique shortest path) as images and text, used for
visual reasoning now and for tool use later (digest §2.1 "Vision Reasoning"; §3 tool-based visual reasoning)."""

from __future__ import annotations

import collections

import numpy as np

from k25jax.data.world import common

WALL, OPEN, START, GOAL = "#", ".", "S", "G"
COLOURS = {WALL: (0, 0, 0), OPEN: (255, 255, 255), START: (30, 160, 50), GOAL: (220, 30, 30)}
MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
MAX_PIXELS = 112


def carve(rng: np.random.Generator, rows: int, cols: int) -> list[str]:
  """A perfect maze by randomized depth-first search: a (2r+1) x (2c+1) grid of '#' and '.'."""
  g = np.full((2 * rows + 1, 2 * cols + 1), WALL)
  seen = np.zeros((rows, cols), bool)
  stack = [(0, 0)]
  seen[0, 0] = True
  g[1, 1] = OPEN
  while stack:
    r, c = stack[-1]
    nbrs = [(r + dr, c + dc) for dr, dc in MOVES.values()
            if 0 <= r + dr < rows and 0 <= c + dc < cols and not seen[r + dr, c + dc]]
    if not nbrs:
      stack.pop()
      continue
    nr, nc = nbrs[rng.integers(len(nbrs))]
    seen[nr, nc] = True
    g[2 * nr + 1, 2 * nc + 1] = OPEN
    g[r + nr + 1, c + nc + 1] = OPEN  # the wall between the two cells
    stack.append((nr, nc))
  return ["".join(row) for row in g]


def shortest_path(grid: list[str]) -> list[tuple[int, int]]:
  """Breadth-first search from S to G over non-wall squares; returns the squares visited, S..G inclusive."""
  find = lambda ch: next((r, row.index(ch)) for r, row in enumerate(grid) if ch in row)
  start, goal = find(START), find(GOAL)
  prev = {start: None}
  queue = collections.deque([start])
  while queue:
    cur = queue.popleft()
    if cur == goal:
      break
    for dr, dc in MOVES.values():
      nxt = (cur[0] + dr, cur[1] + dc)
      if grid[nxt[0]][nxt[1]] != WALL and nxt not in prev:
        prev[nxt] = cur
        queue.append(nxt)
  if goal not in prev:
    raise ValueError("mazes: goal unreachable (the grid is not a valid maze)")
  path = [goal]
  while prev[path[-1]] is not None:
    path.append(prev[path[-1]])
  return path[::-1]


def cell_moves(path: list[tuple[int, int]]) -> str:
  """The path as cell moves (U/D/L/R); one cell move spans two grid squares."""
  inv = {v: k for k, v in MOVES.items()}
  steps = [inv[(b[0] - a[0], b[1] - a[1])] for a, b in zip(path, path[1:])]
  return "".join(steps[::2])


def render(grid: list[str]) -> np.ndarray:
  """Each grid square as a k x k block (k = 112 // grid size): walls black, S green, G red."""
  k = MAX_PIXELS // max(len(grid), len(grid[0]))
  cells = np.array([[COLOURS[ch] for ch in row] for row in grid], np.uint8)
  return np.repeat(np.repeat(cells, k, axis=0), k, axis=1)


def sample(rng: np.random.Generator, *, held_out: bool = False) -> common.WorldItem:
  """A maze of 3..5 x 3..5 cells, S at the top-left cell, G at a random other cell, and one question."""
  del held_out
  rows, cols = (int(v) for v in rng.integers(3, 6, 2))
  rows_ = [list(r) for r in carve(rng, rows, cols)]
  rows_[1][1] = START
  gr, gc = 0, 0
  while (gr, gc) == (0, 0):
    gr, gc = int(rng.integers(rows)), int(rng.integers(cols))
  rows_[2 * gr + 1][2 * gc + 1] = GOAL
  grid = ["".join(r) for r in rows_]
  path = shortest_path(grid)
  moves = cell_moves(path)
  if rng.random() < 0.5:
    question = "How many moves is the shortest path from the green S to the red G?"
    answer, scorer = str(len(moves)), "numeric"
    distractors = [str(len(moves) + d) for d in (-2, -1, 1, 2, 3) if len(moves) + d > 0]
  else:
    question = "Give the moves (U/D/L/R, one per cell) from the green S to the red G."
    answer, scorer = moves, "exact"
    distractors = [moves[::-1], moves[:-1], moves + moves[-1], "".join(sorted(moves))]
  text = "\n".join(grid)
  return common.WorldItem(
      domain="mazes", question=question, answer=answer, response=answer, image=render(grid),
      choices=common.shuffled_choices(rng, answer, distractors), scorer=scorer,
      caption=f"Maze:\n{text}\nPath: {moves}", meta={"grid": grid, "path": path, "moves": moves, "text": text})
