#pragma once
/// \file
/// A small SVG line-chart writer, so a person can look at a run instead of
/// reading its metrics: `plot_metrics` turns the Trainer's metrics.jsonl
/// into training.svg (training loss on the left, held-out bits per byte per
/// language on the right). Torch-free; no plotting dependency.

#include <string>
#include <utility>
#include <vector>

namespace rhine::train {

/// One line of a panel: (x, y) points in drawing order.
struct PlotSeries {
  std::string name;
  std::vector<std::pair<double, double>> points;
};

/// One chart: title, axis labels and its lines (each gets its own colour and
/// a legend entry; non-finite points are left out).
struct PlotPanel {
  std::string title, x_label, y_label;
  std::vector<PlotSeries> series;
};

/// The panels side by side as a standalone SVG document (text is XML-escaped).
std::string render_svg(const std::vector<PlotPanel>& panels);

/// Reads metrics.jsonl written by Trainer and writes the SVG atomically:
/// panel 1 "training loss" (per-step loss and its moving average), panel 2
/// "held-out bits per byte" (one line per language). Returns the number of
/// step records read.
std::size_t plot_metrics(const std::string& metrics_jsonl, const std::string& svg_path);

/// Axis ticks: about `n` "nice" values (1, 2, 2.5, 5 x 10^k) covering [lo, hi].
std::vector<double> nice_ticks(double lo, double hi, int n);

}  // namespace rhine::train
