//! The run report: `report.json` for tools ([`RunReport`], its format), and for people
//! charts of a finished run as SVG files and `report.html`, one self-contained page with
//! the charts inline and the summary tables.
//!
//! Written next to `report.json`:
//! - `accuracy.svg`, `accuracy-time.svg`: test, validation and batch top-1 against
//!   evaluations and wall time, with the float and PTQ accuracies as reference lines;
//! - `fitness.svg`, `fitness-time.svg`: the best candidate's batch cross-entropy and the
//!   validation cross-entropy, with the PTQ network's as reference;
//! - `confidence.svg`: per layer, how the variables' confidence is distributed;
//! - `report.html`.
//!
//! The SVG is written by hand: line charts and bar panels need a few dozen elements, and
//! text is left to the viewer's fonts, so nothing here depends on fonts being installed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::RunConfig;
use crate::history::{EvalPoint, LayerConfidence};
use crate::Error;

/// Top-1 accuracies in percent: test unless the name says validation.
#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub float: f64,
    /// The post-training-quantized network (the search's start).
    pub ptq: f64,
    /// The output network (`model.ccq`, best by validation).
    #[serde(rename = "final")]
    pub final_: f64,
    pub ptq_val: f64,
    pub final_val: f64,
    /// The network at the end of the search (may differ from the output network).
    pub last: f64,
}

/// `report.json`: what a run did and reached.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub seed: u64,
    pub precision: String,
    pub accuracy: Accuracy,
    pub evaluations: u64,
    pub generations: u64,
    pub adoptions: u64,
    pub cycles: u64,
    /// Times the distributions were re-centred after every variable froze
    /// (`search.restarts`).
    pub restarts: u64,
    /// Times the search went back to its best network (`search.rollback`).
    pub rollbacks: u64,
    pub wall_seconds: f64,
    pub search_seconds: f64,
    pub stop_reason: String,
    pub selected: EvalPoint,
    pub frozen_variables: usize,
    pub variables: usize,
    pub workers_seen: u64,
    /// The generation of the checkpoint this process resumed from (`--resume`).
    pub resumed_from_generation: Option<u64>,
    pub model_file: String,
    /// Variable confidence per layer at the end of the search.
    pub layers: Vec<LayerConfidence>,
    pub history: Vec<EvalPoint>,
    pub config: RunConfig,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
/// Plot area margins: left (y tick labels), right, top (title and legend), bottom.
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 88.0;
/// Baseline of the first legend row, and the distance to the second.
const LEGEND_Y: f64 = 48.0;
const LEGEND_ROW: f64 = 18.0;
const BOTTOM: f64 = 52.0;
const FONT: &str = "DejaVu Sans, Helvetica, Arial, sans-serif";

const BLUE: &str = "#1f77b4";
const ORANGE: &str = "#ff7f0e";
const GREEN: &str = "#2ca02c";
const RED: &str = "#d62728";
const GREY: &str = "#555555";

/// Writes `report.json`, the charts and `report.html` into `dir`; returns the files
/// written.
pub fn write(report: &RunReport, dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let path = dir.join("report.json");
    let json = serde_json::to_vec_pretty(report).expect("the report always serialises");
    std::fs::write(&path, json).map_err(|e| ccq_common::Error::io(&path, e))?;
    let mut written = vec![path];
    let charts = charts(report);
    for (file, svg) in &charts {
        let path = dir.join(file);
        std::fs::write(&path, svg).map_err(|e| ccq_common::Error::io(&path, e))?;
        written.push(path);
    }
    let path = dir.join("report.html");
    std::fs::write(&path, html(report, &charts)).map_err(|e| ccq_common::Error::io(&path, e))?;
    written.push(path);
    Ok(written)
}

/// (file name, SVG document) of every chart, in the order the page shows them.
pub fn charts(report: &RunReport) -> Vec<(&'static str, String)> {
    let by_evals = XAxis::Evaluations;
    let by_time = XAxis::wall_time(&report.history);
    vec![
        ("accuracy.svg", accuracy_chart(report, by_evals).to_svg()),
        (
            "accuracy-time.svg",
            accuracy_chart(report, by_time).to_svg(),
        ),
        ("fitness.svg", fitness_chart(report, by_evals).to_svg()),
        ("fitness-time.svg", fitness_chart(report, by_time).to_svg()),
        ("confidence.svg", confidence_chart(&report.layers)),
    ]
}

/// What the history is plotted against.
#[derive(Debug, Clone, Copy)]
enum XAxis {
    Evaluations,
    /// Wall seconds divided by `scale`, named `unit`.
    WallTime {
        scale: f64,
        unit: &'static str,
    },
}

impl XAxis {
    /// Seconds, minutes or hours, whichever keeps the numbers short.
    fn wall_time(history: &[EvalPoint]) -> XAxis {
        let max = history.iter().map(|p| p.wall_seconds).fold(0.0, f64::max);
        let (scale, unit) = if max <= 300.0 {
            (1.0, "s")
        } else if max <= 3.0 * 3600.0 {
            (60.0, "min")
        } else {
            (3600.0, "h")
        };
        XAxis::WallTime { scale, unit }
    }

    fn of(self, p: &EvalPoint) -> f64 {
        match self {
            XAxis::Evaluations => p.evaluations as f64,
            XAxis::WallTime { scale, .. } => p.wall_seconds / scale,
        }
    }

    fn label(self) -> String {
        match self {
            XAxis::Evaluations => "candidate evaluations".into(),
            XAxis::WallTime { unit, .. } => format!("wall time of the search ({unit})"),
        }
    }
}

fn series(
    name: &str,
    color: &'static str,
    history: &[EvalPoint],
    x: XAxis,
    y: impl Fn(&EvalPoint) -> Option<f64>,
) -> Series {
    Series {
        name: name.into(),
        color,
        points: history
            .iter()
            .filter_map(|p| y(p).map(|v| (x.of(p), v)))
            .collect(),
    }
}

fn accuracy_chart(r: &RunReport, x: XAxis) -> LineChart {
    let h = &r.history;
    let a = &r.accuracy;
    LineChart {
        title: format!("Top-1 accuracy, {} ({})", r.precision, r.run_id),
        x_label: x.label(),
        y_label: "top-1 (%)".into(),
        series: vec![
            series("test", BLUE, h, x, |p| Some(p.test_top1)),
            series("validation", ORANGE, h, x, |p| Some(p.val_top1)),
            series("batch (best candidate)", GREEN, h, x, |p| p.train_top1),
        ],
        references: vec![
            Reference {
                name: format!("float {:.2} %", a.float),
                color: GREY,
                y: a.float,
            },
            Reference {
                name: format!("PTQ {:.2} %", a.ptq),
                color: RED,
                y: a.ptq,
            },
        ],
        mark: Some(Mark {
            name: format!("output network {:.2} %", r.selected.test_top1),
            at: (x.of(&r.selected), r.selected.test_top1),
        }),
        y_clamp: Some((0.0, 100.0)),
    }
}

fn fitness_chart(r: &RunReport, x: XAxis) -> LineChart {
    let h = &r.history;
    LineChart {
        title: format!("Cross-entropy, lower is better ({})", r.run_id),
        x_label: x.label(),
        y_label: "mean cross-entropy".into(),
        series: vec![
            series("batch (best candidate): fitness", GREEN, h, x, |p| {
                p.best_fitness
            }),
            series("validation", ORANGE, h, x, |p| Some(p.val_loss)),
        ],
        references: h
            .first()
            .map(|ptq| Reference {
                name: format!("PTQ validation {:.3}", ptq.val_loss),
                color: RED,
                y: ptq.val_loss,
            })
            .into_iter()
            .collect(),
        mark: None,
        y_clamp: Some((0.0, f64::INFINITY)),
    }
}

struct Series {
    name: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

/// A horizontal dashed line at a level worth comparing with.
struct Reference {
    name: String,
    color: &'static str,
    y: f64,
}

/// One point singled out with a ring.
struct Mark {
    name: String,
    at: (f64, f64),
}

struct LineChart {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
    references: Vec<Reference>,
    mark: Option<Mark>,
    /// The y axis never extends past these (accuracy stays within 0..100).
    y_clamp: Option<(f64, f64)>,
}

/// An axis: its range and the ticks labelled on it.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// A range with round ticks (steps of 1, 2 or 5 times a power of ten) covering all
    /// finite `values`; about `target` ticks.
    fn covering(values: impl IntoIterator<Item = f64>, target: usize) -> Axis {
        let (mut min, mut max) = values
            .into_iter()
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if min > max {
            (min, max) = (0.0, 1.0);
        } else if min == max {
            let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.05 };
            (min, max) = (min - pad, max + pad);
        }
        let step = nice_step((max - min) / target.max(1) as f64);
        let lo = (min / step).floor() * step;
        let hi = (max / step).ceil() * step;
        Axis::with_step(lo, hi, step)
    }

    fn with_step(lo: f64, hi: f64, step: f64) -> Axis {
        let n = ((hi - lo) / step).round() as usize;
        let ticks = (0..=n).map(|k| lo + k as f64 * step).collect();
        Axis {
            lo,
            hi,
            step,
            ticks,
        }
    }

    /// Narrows the axis to `[min, max]` (which must overlap it), dropping ticks outside.
    fn clamp(self, min: f64, max: f64) -> Axis {
        let (lo, hi) = (self.lo.max(min), self.hi.min(max));
        let eps = self.step * 1e-9;
        let ticks = self
            .ticks
            .into_iter()
            .filter(|&t| t >= lo - eps && t <= hi + eps)
            .collect();
        Axis {
            lo,
            hi,
            step: self.step,
            ticks,
        }
    }

    /// `v` mapped linearly from `[lo, hi]` to `[from, to]`.
    fn map(&self, v: f64, from: f64, to: f64) -> f64 {
        from + (v - self.lo) / (self.hi - self.lo) * (to - from)
    }
}

/// The smallest of 1, 2, 5, 10 times a power of ten that is at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let nice = if f <= 1.0 + 1e-9 {
        1.0
    } else if f <= 2.0 + 1e-9 {
        2.0
    } else if f <= 5.0 + 1e-9 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A tick label with as many decimals as the step needs; thousands as `k`, millions `M`.
fn tick_label(v: f64, step: f64) -> String {
    let (v, step, suffix) = if step >= 1e6 {
        (v / 1e6, step / 1e6, "M")
    } else if step >= 1e3 {
        (v / 1e3, step / 1e3, "k")
    } else {
        (v, step, "")
    };
    // Snap float noise (0.30000000000000004, -0.0) to the tick it stands for.
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}{suffix}")
}

/// Text for SVG and HTML: the five characters with meaning in markup are escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out += "&amp;",
            '<' => out += "&lt;",
            '>' => out += "&gt;",
            '"' => out += "&quot;",
            '\'' => out += "&#39;",
            c => out.push(c),
        }
    }
    out
}

fn svg_open(out: &mut String, width: f64, height: f64) {
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="{FONT}" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, extra: &str, s: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}"{extra}>{}</text>"#,
        escape(s)
    );
}

impl LineChart {
    fn to_svg(&self) -> String {
        let (x0, x1) = (LEFT, WIDTH - RIGHT);
        let (y0, y1) = (HEIGHT - BOTTOM, TOP);
        let points = || self.series.iter().flat_map(|s| s.points.iter());
        let x_axis = Axis::covering(points().map(|p| p.0), 6);
        let y_values = points()
            .map(|p| p.1)
            .chain(self.references.iter().map(|r| r.y))
            .chain(self.mark.iter().map(|m| m.at.1));
        let mut y_axis = Axis::covering(y_values, 5);
        if let Some((min, max)) = self.y_clamp {
            y_axis = y_axis.clamp(min, max);
        }
        let px = |x: f64| x_axis.map(x, x0, x1);
        let py = |y: f64| y_axis.map(y, y0, y1);

        let mut out = String::new();
        svg_open(&mut out, WIDTH, HEIGHT);
        text(
            &mut out,
            x0,
            24.0,
            "start",
            r#" font-size="15" font-weight="bold""#,
            &self.title,
        );
        self.legend(&mut out);

        // Grid and tick labels.
        for &t in &y_axis.ticks {
            let y = py(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#e5e5e5"/>"##
            );
            text(
                &mut out,
                x0 - 6.0,
                y + 4.0,
                "end",
                "",
                &tick_label(t, y_axis.step),
            );
        }
        for &t in &x_axis.ticks {
            let x = px(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{y0}" stroke="#f0f0f0"/>"##
            );
            text(
                &mut out,
                x,
                y0 + 18.0,
                "middle",
                "",
                &tick_label(t, x_axis.step),
            );
        }
        let _ = writeln!(
            out,
            r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#888888"/>"##,
            x1 - x0,
            y0 - y1
        );
        text(
            &mut out,
            (x0 + x1) / 2.0,
            HEIGHT - 10.0,
            "middle",
            "",
            &self.x_label,
        );
        let (lx, ly) = (16.0, (y0 + y1) / 2.0);
        text(
            &mut out,
            lx,
            ly,
            "middle",
            &format!(r#" transform="rotate(-90 {lx} {ly})""#),
            &self.y_label,
        );

        for r in &self.references {
            let y = py(r.y);
            let _ = writeln!(
                out,
                r#"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="{}" stroke-width="1.5" stroke-dasharray="6 4"/>"#,
                r.color
            );
        }
        if points().next().is_none() {
            text(
                &mut out,
                (x0 + x1) / 2.0,
                (y0 + y1) / 2.0,
                "middle",
                "",
                "no data",
            );
        }
        for s in &self.series {
            let mut sorted = s.points.clone();
            sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
            let path: Vec<String> = sorted
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"/>"#,
                path.join(" "),
                s.color
            );
            // Dots show where measurements are; too many would only blur the line.
            if sorted.len() <= 200 {
                for &(x, y) in &sorted {
                    let _ = writeln!(
                        out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"#,
                        px(x),
                        py(y),
                        s.color
                    );
                }
            }
        }
        if let Some(m) = &self.mark {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="6" fill="none" stroke="black" stroke-width="1.5"/>"#,
                px(m.at.0),
                py(m.at.1)
            );
        }
        out += "</svg>\n";
        out
    }

    /// Under the title, wrapping onto a second row if needed: lines for series, dashes for
    /// references, a ring for the mark.
    fn legend(&self, out: &mut String) {
        enum Swatch<'a> {
            Line(&'a str),
            Dashed(&'a str),
            Ring,
        }
        let items = self
            .series
            .iter()
            .map(|s| (Swatch::Line(s.color), &s.name))
            .chain(
                self.references
                    .iter()
                    .map(|r| (Swatch::Dashed(r.color), &r.name)),
            )
            .chain(self.mark.iter().map(|m| (Swatch::Ring, &m.name)));
        let (mut x, mut y) = (LEFT, LEGEND_Y);
        for (swatch, label) in items {
            // Without font metrics, advance by a generous estimate of the label's width.
            let advance = 34.0 + 6.8 * label.chars().count() as f64 + 16.0;
            if x > LEFT && x + advance > WIDTH - RIGHT {
                (x, y) = (LEFT, y + LEGEND_ROW);
            }
            let (x1, ym) = (x + 26.0, y - 4.0);
            let _ = match swatch {
                Swatch::Line(color) => writeln!(
                    out,
                    r#"<line x1="{x}" y1="{ym}" x2="{x1}" y2="{ym}" stroke="{color}" stroke-width="2"/>"#
                ),
                Swatch::Dashed(color) => writeln!(
                    out,
                    r#"<line x1="{x}" y1="{ym}" x2="{x1}" y2="{ym}" stroke="{color}" stroke-width="1.5" stroke-dasharray="6 4"/>"#
                ),
                Swatch::Ring => writeln!(
                    out,
                    r#"<circle cx="{}" cy="{ym}" r="6" fill="none" stroke="black" stroke-width="1.5"/>"#,
                    x + 13.0
                ),
            };
            text(out, x + 32.0, y, "start", "", label);
            x += advance;
        }
    }
}

/// Small multiples: one histogram of variable confidence per layer, each bar the share of
/// the layer's variables, on one 0-100 % scale so layers compare at a glance.
fn confidence_chart(layers: &[LayerConfidence]) -> String {
    const PANEL_W: f64 = 200.0;
    const PANEL_H: f64 = 150.0;
    const HEADER: f64 = 56.0;
    let cols = layers.len().clamp(1, 4);
    let rows = layers.len().div_ceil(cols).max(1);
    let width = 20.0 + cols as f64 * PANEL_W;
    let height = HEADER + rows as f64 * PANEL_H + 10.0;
    let mut out = String::new();
    svg_open(&mut out, width, height);
    text(
        &mut out,
        20.0,
        24.0,
        "start",
        r#" font-size="15" font-weight="bold""#,
        "Variable confidence per layer",
    );
    text(
        &mut out,
        20.0,
        42.0,
        "start",
        r##" fill="#555555""##,
        "share of the layer's variables per confidence bin (largest probability of the variable's distribution)",
    );
    if layers.is_empty() {
        text(
            &mut out,
            width / 2.0,
            HEADER + 40.0,
            "middle",
            "",
            "no layers",
        );
    }
    for (i, layer) in layers.iter().enumerate() {
        let left = 20.0 + (i % cols) as f64 * PANEL_W;
        let top = HEADER + (i / cols) as f64 * PANEL_H;
        // Plot area of the panel.
        let (px0, px1) = (left + 28.0, left + PANEL_W - 12.0);
        let (py0, py1) = (top + PANEL_H - 30.0, top + 34.0);
        let name: String = if layer.name.chars().count() > 26 {
            layer.name.chars().take(25).chain(['…']).collect()
        } else {
            layer.name.clone()
        };
        text(
            &mut out,
            left + 4.0,
            top + 14.0,
            "start",
            r#" font-weight="bold""#,
            &name,
        );
        text(
            &mut out,
            left + 4.0,
            top + 28.0,
            "start",
            r##" font-size="10" fill="#555555""##,
            &format!(
                "{} vars, {} frozen, mean {:.3}",
                layer.variables, layer.frozen, layer.mean_confidence
            ),
        );
        for (frac, label) in [(0.0, "0"), (0.5, "50%"), (1.0, "100%")] {
            let y = py0 + frac * (py1 - py0);
            let _ = writeln!(
                out,
                r##"<line x1="{px0}" y1="{y:.1}" x2="{px1}" y2="{y:.1}" stroke="#e5e5e5"/>"##
            );
            text(
                &mut out,
                px0 - 3.0,
                y + 3.0,
                "end",
                r#" font-size="9""#,
                label,
            );
        }
        let bins = layer.histogram.len().max(1);
        let bar_w = (px1 - px0) / bins as f64;
        let total = layer.variables.max(1) as f64;
        for (b, &count) in layer.histogram.iter().enumerate() {
            // A bin with any variables stays visible, however small its share.
            let h = (count as f64 / total * (py0 - py1)).max(if count > 0 { 1.0 } else { 0.0 });
            if h > 0.0 {
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{BLUE}"/>"#,
                    px0 + b as f64 * bar_w + 0.5,
                    py0 - h,
                    (bar_w - 1.0).max(0.5),
                    h
                );
            }
        }
        let _ = writeln!(
            out,
            r##"<line x1="{px0}" y1="{py0}" x2="{px1}" y2="{py0}" stroke="#888888"/>"##
        );
        for (frac, label) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
            let x = px0 + frac * (px1 - px0);
            text(
                &mut out,
                x,
                py0 + 12.0,
                "middle",
                r#" font-size="9""#,
                label,
            );
        }
        text(
            &mut out,
            (px0 + px1) / 2.0,
            py0 + 23.0,
            "middle",
            r##" font-size="9" fill="#555555""##,
            "confidence",
        );
    }
    out += "</svg>\n";
    out
}

fn html(r: &RunReport, charts: &[(&str, String)]) -> String {
    let a = &r.accuracy;
    let pct = |v: f64| format!("{v:.2} %");
    let secs = |s: f64| {
        if s < 120.0 {
            format!("{s:.1} s")
        } else {
            format!("{s:.0} s ({:.1} min)", s / 60.0)
        }
    };
    let share = if r.variables > 0 {
        100.0 * r.frozen_variables as f64 / r.variables as f64
    } else {
        0.0
    };
    let summary: Vec<(&str, String)> = vec![
        ("precision", r.precision.clone()),
        ("test top-1, float model", pct(a.float)),
        ("test top-1, PTQ (start of the search)", pct(a.ptq)),
        ("test top-1, output network", pct(a.final_)),
        ("test top-1, network at the end", pct(a.last)),
        (
            "validation top-1, PTQ → output",
            format!("{} → {}", pct(a.ptq_val), pct(a.final_val)),
        ),
        (
            "output network selected at",
            format!(
                "generation {}, {} evaluations",
                r.selected.generation, r.selected.evaluations
            ),
        ),
        (
            "evaluations / generations / adoptions / cycles / restarts / rollbacks",
            format!(
                "{} / {} / {} / {} / {} / {}",
                r.evaluations, r.generations, r.adoptions, r.cycles, r.restarts, r.rollbacks
            ),
        ),
        (
            "frozen variables",
            format!("{} of {} ({share:.1} %)", r.frozen_variables, r.variables),
        ),
        (
            "wall time (search)",
            format!("{} ({})", secs(r.wall_seconds), secs(r.search_seconds)),
        ),
        ("workers seen", r.workers_seen.to_string()),
        ("stopped because", r.stop_reason.clone()),
        ("seed", r.seed.to_string()),
        ("model file", r.model_file.clone()),
    ];
    let svg = |name: &str| {
        charts
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, s)| s.as_str())
    };

    let mut out = String::new();
    let title = format!("ccq run {}", r.run_id);
    let _ = writeln!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>",
        escape(&title)
    );
    out += "<style>\n\
        body { font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }\n\
        table { border-collapse: collapse; margin: 1em 0; }\n\
        td, th { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: left; }\n\
        td.n { text-align: right; font-variant-numeric: tabular-nums; }\n\
        .charts { display: flex; flex-wrap: wrap; gap: 1em; }\n\
        svg { max-width: 100%; height: auto; border: 1px solid #eee; }\n\
        pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }\n\
        </style>\n</head>\n<body>\n";
    let _ = writeln!(out, "<h1>{}</h1>", escape(&title));
    out += "<table class=\"summary\">\n";
    for (k, v) in &summary {
        let _ = writeln!(out, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    out += "</table>\n";
    out += "<h2>Accuracy</h2>\n<div class=\"charts\">\n";
    out += svg("accuracy.svg");
    out += svg("accuracy-time.svg");
    out += "</div>\n<h2>Fitness</h2>\n<div class=\"charts\">\n";
    out += svg("fitness.svg");
    out += svg("fitness-time.svg");
    out += "</div>\n<h2>Variable confidence</h2>\n";
    out += svg("confidence.svg");
    out += "<h2>Layers</h2>\n<table>\n<tr><th>layer</th><th>variables</th><th>frozen</th><th>mean confidence</th></tr>\n";
    for l in &r.layers {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.3}</td></tr>",
            escape(&l.name),
            l.variables,
            l.frozen,
            l.mean_confidence
        );
    }
    out += "</table>\n";
    out += "<h2>History</h2>\n<table>\n<tr><th>generation</th><th>evaluations</th><th>wall s</th>\
            <th>fitness</th><th>batch top-1</th><th>val top-1</th><th>test top-1</th></tr>\n";
    let opt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
    for p in &r.history {
        let _ = writeln!(
            out,
            "<tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.1}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{:.2}</td><td class=\"n\">{:.2}</td></tr>",
            p.generation,
            p.evaluations,
            p.wall_seconds,
            opt(p.best_fitness, 4),
            opt(p.train_top1, 2),
            p.val_top1,
            p.test_top1
        );
    }
    out += "</table>\n";
    if let Ok(config) = toml::to_string(&r.config) {
        let _ = writeln!(
            out,
            "<h2>Configuration</h2>\n<pre>{}</pre>",
            escape(&config)
        );
    }
    out += "</body>\n</html>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round_and_cover_the_values() {
        let a = Axis::covering([0.0, 20_000.0], 6);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 20_000.0, 5_000.0));
        assert_eq!(a.ticks, [0.0, 5e3, 10e3, 15e3, 20e3]);

        // (98.1 - 28.55) / 5 = 13.9 rounds up to a step of 20.
        let a = Axis::covering([28.55, 65.5, 98.1], 5);
        assert_eq!((a.lo, a.hi, a.step), (20.0, 100.0, 20.0));

        let a = Axis::covering([0.42, 0.95, 1.31], 5);
        assert_eq!(a.step, 0.2);
        assert!(a.lo <= 0.42 && a.hi >= 1.31 && a.hi - a.lo < 1.2);

        // Degenerate inputs still give a usable range.
        let a = Axis::covering([5.0, 5.0], 5);
        assert!(a.lo < 5.0 && a.hi > 5.0);
        let a = Axis::covering([f64::NAN], 5);
        assert_eq!((a.lo, a.hi), (0.0, 1.0));

        let a = Axis::covering([20.0, 99.0], 5).clamp(0.0, 100.0);
        assert_eq!(a.hi, 100.0);
        let a = Axis::covering([91.0, 99.5], 4).clamp(0.0, 100.0);
        assert_eq!((a.lo, a.hi), (90.0, 100.0));
        assert_eq!(a.ticks.last(), Some(&100.0));
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick_label(15_000.0, 5_000.0), "15k");
        assert_eq!(tick_label(2_500.0, 500.0), "2500");
        assert_eq!(tick_label(3e6, 1e6), "3M");
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(tick_label(-1e-17, 0.2), "0");
        assert_eq!(tick_label(0.0, 5_000.0), "0");
        assert_eq!(tick_label(1.5, 0.5), "1.5");
        assert_eq!(tick_label(40.0, 20.0), "40");
    }

    #[test]
    fn lines_land_on_the_plot_area_corners() {
        let chart = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                name: "s".into(),
                color: BLUE,
                // Out of order on purpose: the line is drawn left to right.
                points: vec![(100.0, 100.0), (0.0, 0.0), (50.0, 40.0)],
            }],
            references: vec![Reference {
                name: "r".into(),
                color: RED,
                y: 50.0,
            }],
            mark: None,
            y_clamp: None,
        };
        let svg = chart.to_svg();
        // Plot area: x 64..696, y 348 (value 0) up to 88 (value 100).
        assert!(
            svg.contains(r#"<polyline points="64.0,348.0 380.0,244.0 696.0,88.0""#),
            "{svg}"
        );
        assert!(svg.contains(r##"<line x1="64" y1="218.0" x2="696" y2="218.0" stroke="#d62728""##));
    }

    fn point(generation: u64, evaluations: u64, secs: f64, test: f64) -> EvalPoint {
        EvalPoint {
            generation,
            evaluations,
            wall_seconds: secs,
            best_fitness: (generation > 0).then_some(1.0 / (1.0 + generation as f64)),
            train_top1: (generation > 0).then_some(test + 2.0),
            val_top1: test - 1.0,
            val_loss: 3.0 - test / 50.0,
            test_top1: test,
            network_version: generation,
            is_final: false,
        }
    }

    fn report() -> RunReport {
        let config: RunConfig = toml::from_str(
            "[model]\nonnx = \"m.onnx\"\nmean = [0.1]\nstd = [0.3]\n\
             [data]\nsource = \"mnist:d\"\n[budget]\nevaluations = 3200\n",
        )
        .unwrap();
        let history = vec![
            point(0, 0, 0.0, 28.5),
            point(100, 1600, 400.0, 70.25),
            point(200, 3200, 800.0, 80.5),
        ];
        RunReport {
            run_id: "a<b>&c-seed1".into(),
            seed: 1,
            precision: "w2a8".into(),
            accuracy: Accuracy {
                float: 98.1,
                ptq: 28.5,
                final_: 80.5,
                ptq_val: 27.5,
                final_val: 79.5,
                last: 80.5,
            },
            evaluations: 3200,
            generations: 200,
            adoptions: 150,
            cycles: 1,
            restarts: 0,
            rollbacks: 0,
            wall_seconds: 812.0,
            search_seconds: 800.0,
            stop_reason: "evaluation budget spent".into(),
            selected: history[2].clone(),
            frozen_variables: 30,
            variables: 120,
            workers_seen: 2,
            resumed_from_generation: None,
            model_file: "runs/x/model.ccq".into(),
            layers: vec![
                LayerConfidence {
                    name: "conv<1>".into(),
                    variables: 100,
                    frozen: 30,
                    mean_confidence: 0.9,
                    histogram: [vec![0; 16], vec![10, 20, 40, 30]].concat(),
                },
                LayerConfidence {
                    name: "fc".into(),
                    variables: 20,
                    frozen: 0,
                    mean_confidence: 0.8,
                    histogram: [vec![0; 16], vec![20, 0, 0, 0]].concat(),
                },
            ],
            history,
            config,
        }
    }

    /// Every tag closed in order, attributes quoted, no stray `<` or `&` in text.
    fn assert_well_formed(doc: &str) {
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = doc;
        while let Some(start) = rest.find('<') {
            let text = &rest[..start];
            assert!(!text.contains('>'), "stray > in {text:?}");
            for (i, _) in text.match_indices('&') {
                let entity = &text[i..text[i..].find(';').map_or(text.len(), |e| i + e + 1)];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"].contains(&entity),
                    "bad entity {entity:?}"
                );
            }
            let end = start + rest[start..].find('>').expect("unclosed tag");
            let tag = &rest[start + 1..end];
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in <{tag}>"
            );
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop(),
                    Some(name),
                    "</{name}> closes the wrong element"
                );
            } else if !tag.ends_with('/') && !tag.starts_with('!') {
                let name = tag.split([' ', '\n']).next().unwrap();
                if !["meta"].contains(&name) {
                    stack.push(name);
                }
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed elements {stack:?}");
    }

    #[test]
    fn report_files_are_written_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let r = report();
        let written = write(&r, dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "report.json",
                "accuracy.svg",
                "accuracy-time.svg",
                "fitness.svg",
                "fitness-time.svg",
                "confidence.svg",
                "report.html"
            ]
        );
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&written[0]).unwrap()).unwrap();
        assert_eq!(json["run_id"], r.run_id.as_str());
        assert_eq!(json["accuracy"]["final"], r.accuracy.final_);
        for p in &written[1..] {
            assert_well_formed(&std::fs::read_to_string(p).unwrap());
        }
        let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
        // Self-contained: the charts are inline, nothing is fetched.
        assert_eq!(html.matches("<svg ").count(), 5);
        assert!(!html.contains("src=") && !html.contains("href="));
        assert!(html.contains("<h1>ccq run a&lt;b&gt;&amp;c-seed1</h1>"));
        assert!(html.contains("<td>80.50 %</td>"));
        assert!(html.contains("<td>30 of 120 (25.0 %)</td>"));
        assert!(html.contains("<td>conv&lt;1&gt;</td>"));
        // The wall-time axis switches to minutes past five minutes of search.
        let time = std::fs::read_to_string(dir.path().join("accuracy-time.svg")).unwrap();
        assert!(time.contains("wall time of the search (min)"));
    }

    #[test]
    fn accuracy_chart_draws_every_level() {
        let r = report();
        let svg = accuracy_chart(&r, XAxis::Evaluations).to_svg();
        // Axis 20..100 over y 348..88: 98.1 % at 348 - 78.1/80*260 = 94.2; 28.5 % at 320.4.
        assert!(
            svg.contains(r##"y1="94.2" x2="696" y2="94.2" stroke="#555555""##),
            "{svg}"
        );
        assert!(svg.contains(r##"y1="320.4" x2="696" y2="320.4" stroke="#d62728""##));
        // The selected network is ringed: 3200 of 0..4000 evaluations, 80.5 % at y 151.4.
        assert!(svg.contains(r#"<circle cx="569.6" cy="151.4" r="6""#));
        assert!(svg.contains(">float 98.10 %</text>") && svg.contains(">PTQ 28.50 %</text>"));
        // The batch accuracy has no value before the first generation: two points only.
        let batch = svg
            .lines()
            .find(|l| l.contains("polyline") && l.contains(GREEN))
            .unwrap();
        assert_eq!(batch.matches(',').count(), 2);
    }

    #[test]
    fn confidence_bars_are_shares_of_the_layer() {
        let svg = confidence_chart(&report().layers);
        // conv<1>: 40 of 100 variables in bin 18; the panel is 86 px tall (y 90..176).
        assert!(svg.contains(r##"height="34.4" fill="#1f77b4""##), "{svg}");
        // fc: all 20 variables in bin 16, the full height.
        assert!(svg.contains(r##"height="86.0" fill="#1f77b4""##));
        assert!(svg.contains(">conv&lt;1&gt;</text>"));
        assert!(confidence_chart(&[]).contains(">no layers</text>"));
    }
}
