// The one SVG writer of the CLI: every picture (pattern, leakcheck, cost,
// bench) is a white page of elements built here, so numbers, escaping and
// the document frame are written one way.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lookback::cli::svg {

// A coordinate with at most two decimals and no trailing zeros ("12.5", "3").
std::string number(double value);

// Text for element content or an attribute value (&, <, >, ").
std::string escape(std::string_view text);

// One coloured square and its label in a legend.
struct Swatch {
  std::string_view colour;
  std::string_view label;
};

// The words around a matrix plot: a bold heading, a grey subtitle under it,
// the column axis' name above the plot and the row axis' name, turned, on its
// left.
struct MatrixTitles {
  std::string_view heading;
  std::string_view heading_attributes;  // e.g. font-size="16" font-weight="bold"
  std::string_view subtitle;
  std::string_view columns;
  std::string_view rows;
  double rows_x = 16;  // where the turned row-axis name stands
};

class Document {
 public:
  // A document of width x height px on white, <title>d `title`.
  // `font_size` ("12") sets the default for text without its own.
  Document(double width, double height, std::string_view title, std::string_view font_size = {});

  // <text x y ATTRIBUTES>content</text>; `attributes` as written in SVG.
  void text(double x, double y, std::string_view content, std::string_view attributes = {});
  // Text turned a quarter anticlockwise about (x, y), for a vertical axis.
  void vertical_text(double x, double y, std::string_view content,
                     std::string_view attributes = {});
  void line(double x1, double y1, double x2, double y2, std::string_view attributes);
  // A dot of radius r at (x, y).
  void circle(double x, double y, double r, std::string_view colour);
  // A chart's axes: the left and bottom edges of the plot, in black.
  void axes(double left, double top, double width, double height);
  // A line through `points` (x, y) in `colour`, 2 px wide.
  void polyline(const std::vector<std::pair<double, double>>& points, std::string_view colour);
  // Swatches side by side from (x, y), `gap` px between one label and the
  // next swatch.
  void legend(double x, double y, const std::vector<Swatch>& swatches, double gap);
  void matrix_titles(const MatrixTitles& titles, double left, double top, double plot_width,
                     double plot_height);
  // White lines between the cells of a `columns` x `rows` grid of
  // cell_width x cell_height px cells whose corner is (left, top).
  void grid(double left, double top, double cell_width, double cell_height, std::int64_t columns,
            std::int64_t rows);
  // Anything else, as written.
  void raw(std::string_view markup);

  // Closes the document and returns it.
  std::string finish();

 private:
  std::string out_;
};

// Appends to path data `d` a 1-high rectangle of `length` cells starting at
// (column, row), in cell units: runs of equal cells as sub-paths of one path.
void add_cell_run(std::string& d, std::int64_t column, std::int64_t row, std::int64_t length);

}  // namespace lookback::cli::svg
