#include "svg.hpp"

#include <fmt/format.h>

#include <iterator>

namespace lookback::cli::svg {

std::string number(double value) {
  std::string text = fmt::format("{:.2f}", value);
  while (text.back() == '0') text.pop_back();
  if (text.back() == '.') text.pop_back();
  return text == "-0" ? "0" : text;
}

std::string escape(std::string_view text) {
  std::string escaped;
  for (char c : text) {
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      default: escaped += c;
    }
  }
  return escaped;
}

Document::Document(double width, double height, std::string_view title,
                   std::string_view font_size) {
  fmt::format_to(std::back_inserter(out_),
                 "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
                 "viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\"{2}>\n"
                 "<title>{3}</title>\n"
                 "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
                 number(width), number(height),
                 font_size.empty() ? std::string() : fmt::format(" font-size=\"{}\"", font_size),
                 escape(title));
}

void Document::text(double x, double y, std::string_view content, std::string_view attributes) {
  fmt::format_to(std::back_inserter(out_), "<text x=\"{}\" y=\"{}\"{}{}>{}</text>\n", number(x),
                 number(y), attributes.empty() ? "" : " ", attributes, escape(content));
}

void Document::vertical_text(double x, double y, std::string_view content,
                             std::string_view attributes) {
  fmt::format_to(std::back_inserter(out_),
                 "<text transform=\"translate({} {}) rotate(-90)\"{}{}>{}</text>\n", number(x),
                 number(y), attributes.empty() ? "" : " ", attributes, escape(content));
}

void Document::line(double x1, double y1, double x2, double y2, std::string_view attributes) {
  fmt::format_to(std::back_inserter(out_), "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" {}/>\n",
                 number(x1), number(y1), number(x2), number(y2), attributes);
}

void Document::circle(double x, double y, double r, std::string_view colour) {
  fmt::format_to(std::back_inserter(out_), "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{}\"/>\n",
                 number(x), number(y), number(r), colour);
}

void Document::axes(double left, double top, double width, double height) {
  line(left, top, left, top + height, "stroke=\"black\"");
  line(left, top + height, left + width, top + height, "stroke=\"black\"");
}

void Document::polyline(const std::vector<std::pair<double, double>>& points,
                        std::string_view colour) {
  std::string list;
  for (const auto& [x, y] : points) {
    fmt::format_to(std::back_inserter(list), "{}{},{}", list.empty() ? "" : " ", number(x),
                   number(y));
  }
  fmt::format_to(std::back_inserter(out_),
                 "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
                 colour, list);
}

void Document::legend(double x, double y, const std::vector<Swatch>& swatches, double gap) {
  for (const Swatch& swatch : swatches) {
    fmt::format_to(std::back_inserter(out_),
                   "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/>\n", number(x),
                   number(y), swatch.colour);
    text(x + 17, y + 10.5, swatch.label, "font-size=\"12\"");
    // About 6.5 px per character at font-size 12, plus the swatch and the gap.
    x += 17 + 6.5 * static_cast<double>(swatch.label.size()) + gap;
  }
}

void Document::matrix_titles(const MatrixTitles& titles, double left, double top,
                             double plot_width, double plot_height) {
  text(left, 24, titles.heading, titles.heading_attributes);
  text(left, 44, titles.subtitle, "font-size=\"12\" fill=\"#444\"");
  text(left + plot_width / 2, 66, titles.columns, "font-size=\"12\" text-anchor=\"middle\"");
  vertical_text(titles.rows_x, top + plot_height / 2, titles.rows,
                "font-size=\"12\" text-anchor=\"middle\"");
}

void Document::grid(double left, double top, double cell_width, double cell_height,
                    std::int64_t columns, std::int64_t rows) {
  const auto x = [&](std::int64_t column) { return number(left + column * cell_width); };
  const auto y = [&](std::int64_t row) { return number(top + row * cell_height); };
  auto out = std::back_inserter(out_);
  out_ += "<path fill=\"none\" stroke=\"white\" stroke-width=\"1\" d=\"";
  for (std::int64_t column = 1; column < columns; ++column) {
    fmt::format_to(out, "M{} {}V{}", x(column), y(0), y(rows));
  }
  for (std::int64_t row = 1; row < rows; ++row) {
    fmt::format_to(out, "M{} {}H{}", x(0), y(row), x(columns));
  }
  out_ += "\"/>\n";
}

void Document::raw(std::string_view markup) { out_ += markup; }

std::string Document::finish() {
  out_ += "</svg>\n";
  return std::move(out_);
}

void add_cell_run(std::string& d, std::int64_t column, std::int64_t row, std::int64_t length) {
  fmt::format_to(std::back_inserter(d), "M{} {}h{}v1h-{}z", column, row, length, length);
}

}  // namespace lookback::cli::svg
