//! SVG plots of what a benchmark measured (`--plot FILE.svg`): latency
//! distributions per case, restore timelines (pages installed on demand
//! and ahead of demand over time), and restore times per vCPU count.
//!
//! One file per run; each figure is a panel of it. Text is SVG `<text>`,
//! so nothing here needs fonts or system libraries.

use std::path::Path;
use std::time::{Duration, Instant};

use plotters::coord::Shift;
use plotters::prelude::*;
use uffd_pager::Bucket;

use crate::BoxError;

/// A latency distribution to plot.
#[derive(Debug, Clone)]
pub struct Distribution {
    /// Legend label.
    pub label: String,
    /// Its histogram buckets.
    pub buckets: Vec<Bucket>,
}

/// One sample of a restore's progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the restore started.
    pub seconds: f64,
    /// Pages installed because a thread faulted on them.
    pub on_demand: u64,
    /// Pages installed before anything touched them (readahead, replay,
    /// background fill).
    pub ahead: u64,
}

/// A restore's progress over time.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// Legend label.
    pub label: String,
    /// Samples in time order.
    pub samples: Vec<Sample>,
}

/// Restore times of one case at several vCPU counts.
#[derive(Debug, Clone)]
pub struct RestoreTimes {
    /// Legend label.
    pub label: String,
    /// `(vcpus, seconds of each round)`.
    pub points: Vec<(usize, Vec<f64>)>,
}

/// One panel of a plot.
#[derive(Debug, Clone)]
pub enum Panel {
    /// Latency distributions, x in µs (log scale), y the share of samples.
    Latency {
        /// Panel title (says what was timed).
        title: String,
        /// One line each.
        series: Vec<Distribution>,
    },
    /// Pages installed over time: one solid line (on demand) and one
    /// dashed (ahead of demand) per restore.
    Timeline {
        /// Panel title.
        title: String,
        /// One restore each.
        series: Vec<Timeline>,
    },
    /// Restore-to-done seconds per vCPU count: every round a point, the
    /// medians joined by a line.
    Restores {
        /// Panel title.
        title: String,
        /// One case each.
        series: Vec<RestoreTimes>,
    },
}

/// Merges the buckets of several histograms of the same layout.
pub fn merge(histograms: &[&[Bucket]]) -> Vec<Bucket> {
    let mut all: Vec<Bucket> = histograms.iter().flat_map(|h| h.iter().copied()).collect();
    all.sort_by_key(|b| b.low_ns);
    let mut merged: Vec<Bucket> = Vec::with_capacity(all.len());
    for b in all {
        match merged.last_mut() {
            Some(last) if last.low_ns == b.low_ns => last.count += b.count,
            _ => merged.push(b),
        }
    }
    merged
}

/// Runs `work` while a thread samples `probe` every `every`; returns the
/// work's result and the samples (one at the start and one at the end
/// included).
pub fn sample_while<R>(
    every: Duration,
    probe: impl Fn() -> (u64, u64) + Sync,
    work: impl FnOnce() -> R,
) -> (R, Vec<Sample>) {
    let started = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let sample = |probe: &dyn Fn() -> (u64, u64)| {
        let (on_demand, ahead) = probe();
        Sample {
            seconds: started.elapsed().as_secs_f64(),
            on_demand,
            ahead,
        }
    };
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut samples = vec![sample(&probe)];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(every);
                samples.push(sample(&probe));
            }
            samples
        });
        let result = work();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut samples = sampler.join().expect("the sampler does not panic");
        samples.push(sample(&probe));
        (result, samples)
    })
}

/// Writes `panels`, stacked, as one SVG file at `path`.
pub fn write_svg(path: &Path, title: &str, panels: &[Panel]) -> Result<(), BoxError> {
    if panels.is_empty() {
        return Err("nothing to plot".into());
    }
    let height = 80 + 420 * panels.len() as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(plot_error)?;
    let areas = root.split_evenly((panels.len(), 1));
    for (panel, area) in panels.iter().zip(&areas) {
        match panel {
            Panel::Latency { title, series } => latency(area, title, series)?,
            Panel::Timeline { title, series } => timeline(area, title, series)?,
            Panel::Restores { title, series } => restores(area, title, series)?,
        }
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::error::Error + Send + Sync>(e: E) -> BoxError {
    format!("writing the plot: {e}").into()
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    COLORS[i % COLORS.len()]
}

fn latency(area: &Area<'_>, title: &str, series: &[Distribution]) -> Result<(), BoxError> {
    let us = |ns: u64| ns as f64 / 1000.0;
    let points: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|d| {
            let total: u64 = d.buckets.iter().map(|b| b.count).sum();
            d.buckets
                .iter()
                .map(|b| {
                    let middle = us(b.low_ns) + us(b.width_ns) / 2.0;
                    (middle.max(0.01), b.count as f64 / total.max(1) as f64)
                })
                .collect()
        })
        .collect();
    let all = points.iter().flatten();
    let x_min = all.clone().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = all.clone().map(|p| p.0).fold(0.0, f64::max);
    let y_max = all.map(|p| p.1).fold(0.0, f64::max);
    let (x_min, x_max) = if x_min.is_finite() {
        (x_min * 0.8, (x_max * 1.25).max(x_min * 2.0))
    } else {
        (0.1, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..(y_max * 1.1).max(0.01))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("latency, µs (log scale)")
        .y_desc("share of samples")
        .draw()
        .map_err(plot_error)?;
    for (i, (d, p)) in series.iter().zip(points).enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(p, c.stroke_width(2)))
            .map_err(plot_error)?
            .label(d.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn timeline(area: &Area<'_>, title: &str, series: &[Timeline]) -> Result<(), BoxError> {
    let x_max = series
        .iter()
        .flat_map(|t| t.samples.iter().map(|s| s.seconds))
        .fold(0.0, f64::max)
        .max(1e-3);
    let y_max = series
        .iter()
        .flat_map(|t| t.samples.iter().map(|s| s.on_demand.max(s.ahead)))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max * 1.02, 0.0..y_max * 1.05)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the restore started")
        .y_desc("pages installed")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(plot_error)?;
    for (i, t) in series.iter().enumerate() {
        let c = color(i);
        let demand: Vec<(f64, f64)> = t
            .samples
            .iter()
            .map(|s| (s.seconds, s.on_demand as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(demand, c.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("{}: on demand", t.label))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        if t.samples.iter().any(|s| s.ahead > 0) {
            let ahead: Vec<(f64, f64)> = t
                .samples
                .iter()
                .map(|s| (s.seconds, s.ahead as f64))
                .collect();
            let light = c.mix(0.5);
            chart
                .draw_series(DashedLineSeries::new(ahead, 6, 4, light.stroke_width(2)))
                .map_err(plot_error)?
                .label(format!("{}: ahead of demand", t.label))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], light.stroke_width(2))
                });
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

fn restores(area: &Area<'_>, title: &str, series: &[RestoreTimes]) -> Result<(), BoxError> {
    let vcpus: Vec<usize> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let x_max = vcpus.iter().copied().max().unwrap_or(1).max(2) as f64;
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().flat_map(|p| p.1.iter().copied()))
        .fold(0.0, f64::max)
        .max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((0.8..x_max * 1.25).log_scale(), 0.0..y_max * 1.1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("vCPU threads of the VMM (log scale)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("restore-to-done, seconds")
        .draw()
        .map_err(plot_error)?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        let rounds = s
            .points
            .iter()
            .flat_map(|(v, secs)| secs.iter().map(move |&t| (*v as f64, t)));
        chart
            .draw_series(rounds.map(|p| Circle::new(p, 3, c.filled())))
            .map_err(plot_error)?;
        let medians: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|(v, secs)| (*v as f64, crate::report::median(secs.clone())))
            .collect();
        chart
            .draw_series(LineSeries::new(medians, c.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("{} (median; dots: rounds)", s.label))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn legend<'a, 'b: 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Result<(), BoxError> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(low_ns: u64, count: u64) -> Bucket {
        Bucket {
            low_ns,
            width_ns: 64,
            count,
        }
    }

    #[test]
    fn merging_adds_counts_of_equal_buckets() {
        let a = [bucket(1024, 2), bucket(2048, 1)];
        let b = [bucket(1024, 3), bucket(4096, 5)];
        assert_eq!(
            merge(&[&a, &b]),
            vec![bucket(1024, 5), bucket(2048, 1), bucket(4096, 5)]
        );
    }

    #[test]
    fn sampling_brackets_the_work() {
        let counter = std::sync::atomic::AtomicU64::new(0);
        let (r, samples) = sample_while(
            Duration::from_millis(1),
            || (counter.load(std::sync::atomic::Ordering::Relaxed), 0),
            || {
                for _ in 0..5 {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
                7
            },
        );
        assert_eq!(r, 7);
        assert!(samples.len() >= 2);
        assert_eq!(samples.last().unwrap().on_demand, 5);
        assert!(samples.windows(2).all(|w| w[0].seconds <= w[1].seconds));
    }
}
