//! Showing a [`Plan`]: the Terraform-like text for humans and the JSON for machines. Both read only the plan
//! (never the config or the observation), so a saved plan file renders exactly as it was planned.

use std::fmt::Write;

use anstyle::{AnsiColor, Style};
use similar::{ChangeTag, TextDiff};

use super::{Action, Change, CostLine, Plan, PoolStatus};

/// How to render for humans.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions {
    /// ANSI colours (green `+`, red `-`, yellow `~`); off means no escape code at all.
    pub color: bool,
}

/// The plan as a human reads it: per pool its numbers, changes with reasons and attribute diffs, and notes;
/// then the totals (`Plan: ...` or `No changes.`) and the cost line.
pub fn render_human(plan: &Plan, opts: &RenderOptions) -> String {
    let painter = Painter { color: opts.color };
    let mut out = String::new();

    for status in &plan.pools {
        render_pool_header(&mut out, status);
        let mut shown = Vec::new();
        for change in plan.changes.iter().filter(|change| change.pool == status.pool) {
            render_change(&mut out, change, &painter, &mut shown);
        }
        for note in &status.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out.push('\n');
    }

    // Changes whose pool is not configured (orphans of a removed pool), grouped by the pool named on them.
    let mut orphan_pools: Vec<&str> = plan
        .changes
        .iter()
        .filter(|change| !plan.pools.iter().any(|status| status.pool == change.pool))
        .map(|change| change.pool.as_str())
        .collect();
    orphan_pools.dedup();
    for pool in orphan_pools {
        if pool.is_empty() {
            let _ = writeln!(out, "without a pool:");
        } else {
            let _ = writeln!(out, "pool `{pool}` (not in the config):");
        }
        let mut shown = Vec::new();
        for change in plan.changes.iter().filter(|change| change.pool.as_str() == pool) {
            render_change(&mut out, change, &painter, &mut shown);
        }
        out.push('\n');
    }

    // Outside every pool: orphans kept and why, records that only look like ours.
    for note in &plan.notes {
        let _ = writeln!(out, "note: {note}");
    }
    if !plan.notes.is_empty() {
        out.push('\n');
    }

    let summary = &plan.summary;
    if plan.changes.is_empty() {
        out.push_str("No changes.\n");
    } else {
        if summary.drain > 0 || summary.deregister > 0 {
            let _ = writeln!(out, "Also: {} to drain, {} to deregister.", summary.drain, summary.deregister);
        }
        let _ = writeln!(
            out,
            "Plan: {} to create, {} to start, {} to stop, {} to delete.",
            summary.create, summary.start, summary.stop, summary.delete
        );
    }
    out.push_str(&render_cost(plan));
    out.push('\n');
    out
}

/// The plan as pretty JSON with a trailing newline: the same types `--json` prints and plan files hold.
pub fn render_json(plan: &Plan) -> String {
    match serde_json::to_string_pretty(plan) {
        Ok(mut json) => {
            json.push('\n');
            json
        }
        // Unreachable for these plain types; still never panic on output.
        Err(error) => format!("{{\"error\": {:?}}}\n", error.to_string()),
    }
}

/// `pool `linux`: jobs 3 pending, 1 running; agents 2 active (1 busy, 1 idle), 4 desired`: which numbers count
/// jobs and which count agents is said, not left to guess.
fn render_pool_header(out: &mut String, status: &PoolStatus) {
    let window = status.window.as_ref().map(|window| format!(" (schedule `{window}`)")).unwrap_or_default();
    let _ = writeln!(
        out,
        "pool `{}`: jobs {} pending, {} running; agents {} active ({} busy, {} idle), {} desired{window}",
        status.pool, status.pending_jobs, status.running_jobs, status.active, status.busy, status.idle, status.desired
    );
}

/// The attribute block of a change already shown in this pool: (action, before, after) and the target it was
/// shown for.
type ShownBlock<'p> =
    (Action, &'p std::collections::BTreeMap<String, String>, &'p std::collections::BTreeMap<String, String>, String);

/// One change: its line, then its attribute diff, unless an earlier change of the same pool had the very same
/// one (ten creates of one pool are ten lines and one block, not ten identical blocks).
fn render_change<'p>(out: &mut String, change: &'p Change, painter: &Painter, shown: &mut Vec<ShownBlock<'p>>) {
    let symbol = change.action.symbol();
    let _ = writeln!(
        out,
        "  {} {} {}: {}",
        painter.paint(symbol_style(change.action), &format!("{symbol:>3}")),
        change.action.verb(),
        describe_target(change),
        change.reason
    );
    if change.before.is_empty() && change.after.is_empty() {
        return;
    }
    let same = shown.iter().find(|(action, before, after, _)| {
        *action == change.action && **before == change.before && **after == change.after
    });
    if let Some((_, _, _, first)) = same {
        let _ = writeln!(out, "        (attributes as for {first})");
        return;
    }
    shown.push((change.action, &change.before, &change.after, short_target(change)));
    let lines = |map: &std::collections::BTreeMap<String, String>| {
        map.iter().map(|(key, value)| format!("{key} = {value}\n")).collect::<String>()
    };
    let (before, after) = (lines(&change.before), lines(&change.after));
    let diff = TextDiff::from_lines(&before, &after);
    for line in diff.iter_all_changes() {
        let (sign, style) = match line.tag() {
            ChangeTag::Delete => ("-", red()),
            ChangeTag::Insert => ("+", green()),
            ChangeTag::Equal => (" ", Style::new()),
        };
        let text = format!("{sign} {}", line.value().trim_end_matches('\n'));
        let _ = writeln!(out, "        {}", painter.paint(style, &text));
    }
}

/// The name a change's target goes by in a back reference.
fn short_target(change: &Change) -> String {
    match (&change.instance, &change.agent) {
        (Some(instance), _) => instance.name.clone(),
        (None, Some(agent)) => format!("agent {}", agent.name),
        (None, None) => "(nothing)".to_owned(),
    }
}

fn describe_target(change: &Change) -> String {
    match (&change.instance, &change.agent) {
        (Some(instance), _) => match &instance.id {
            Some(id) => format!("{} ({} {})", instance.name, instance.backend, id),
            None => format!("{} (new in {})", instance.name, instance.backend),
        },
        (None, Some(agent)) => format!("agent {} ({} {})", agent.name, agent.ci, agent.id),
        (None, None) => "(nothing)".to_owned(),
    }
}

fn render_cost(plan: &Plan) -> String {
    let cost = &plan.cost;
    if cost.hourly.is_empty() {
        return match cost.unpriced_before.max(cost.unpriced_after) {
            0 => "Cost: unknown".to_owned(),
            count => format!("Cost: unknown (no price for {count} instance{})", if count == 1 { "" } else { "s" }),
        };
    }
    let lines: Vec<String> = cost.hourly.iter().map(|(currency, line)| cost_line(currency, line)).collect();
    let mut text = format!("Cost: {}", lines.join(", "));
    if cost.unpriced_before > 0 || cost.unpriced_after > 0 {
        let _ = write!(text, "; unpriced instances: {} → {}", cost.unpriced_before, cost.unpriced_after);
    }
    text
}

fn cost_line(currency: &str, line: &CostLine) -> String {
    let delta = line.after - line.before;
    let change = if delta.abs() < 0.000_05 {
        "no change".to_owned()
    } else if delta > 0.0 {
        format!("+{}/h", money(currency, delta))
    } else {
        format!("-{}/h", money(currency, -delta))
    };
    format!("{}/h → {}/h ({change})", money(currency, line.before), money(currency, line.after))
}

fn money(currency: &str, amount: f64) -> String {
    match currency {
        "EUR" => format!("€{amount:.4}"),
        "USD" => format!("${amount:.4}"),
        other => format!("{other} {amount:.4}"),
    }
}

fn symbol_style(action: Action) -> Style {
    match action {
        Action::Create | Action::Start => green(),
        Action::Delete | Action::Stop | Action::Deregister => red(),
        Action::Drain | Action::Replace => yellow(),
    }
}

fn green() -> Style {
    Style::new().fg_color(Some(AnsiColor::Green.into()))
}
fn red() -> Style {
    Style::new().fg_color(Some(AnsiColor::Red.into()))
}
fn yellow() -> Style {
    Style::new().fg_color(Some(AnsiColor::Yellow.into()))
}

struct Painter {
    color: bool,
}

impl Painter {
    fn paint(&self, style: Style, text: &str) -> String {
        if self.color && style != Style::new() {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::BackendName;
    use crate::plan::{Cost, InstanceTarget, Summary};

    fn sample(changes: Vec<Change>, hourly: BTreeMap<String, CostLine>) -> Plan {
        Plan {
            format_version: 1,
            ciscale_version: "0.0.0".into(),
            config_hash: "sha256:x".into(),
            observed_fingerprint: "sha256:y".into(),
            planned_at: "2026-01-01T12:00:00Z".parse().unwrap(),
            pools: Vec::new(),
            summary: Summary { delete: changes.len() as u32, ..Summary::default() },
            changes,
            notes: Vec::new(),
            cost: Cost { hourly, unpriced_before: 0, unpriced_after: 0 },
        }
    }

    fn delete_change() -> Change {
        Change {
            pool: "gone".into(),
            action: Action::Delete,
            instance: Some(InstanceTarget {
                backend: BackendName::new("cloud"),
                id: Some("7".into()),
                name: "ci-gone-1".into(),
            }),
            agent: None,
            reason: "orphan".into(),
            cause: None,
            before: [("serverType".to_owned(), "cx22".to_owned())].into(),
            after: BTreeMap::new(),
        }
    }

    #[test]
    fn color_only_when_asked() {
        let plan = sample(vec![delete_change()], BTreeMap::new());
        let plain = render_human(&plan, &RenderOptions { color: false });
        let colored = render_human(&plan, &RenderOptions { color: true });
        assert!(!plain.contains('\u{1b}'));
        assert!(colored.contains("\u{1b}[31m"), "red for a delete: {colored:?}");
        assert!(plain.contains("pool `gone` (not in the config):"));
        assert!(plain.contains("        - serverType = cx22\n"));
        assert!(plain.contains("Plan: 0 to create, 0 to start, 0 to stop, 1 to delete.\nCost: unknown\n"));
    }

    #[test]
    fn identical_attribute_blocks_of_a_pool_are_shown_once() {
        let create = |name: &str, server_type: &str| Change {
            pool: "gone".into(),
            action: Action::Create,
            instance: Some(InstanceTarget { backend: BackendName::new("cloud"), id: None, name: name.into() }),
            agent: None,
            reason: "demand".into(),
            before: BTreeMap::new(),
            after: [("machine.serverType".to_owned(), server_type.to_owned())].into(),
            cause: None,
        };
        let plan = sample(vec![create("a-1", "cx22"), create("a-2", "cx22"), create("a-3", "cx32")], BTreeMap::new());
        let text = render_human(&plan, &RenderOptions::default());
        assert_eq!(text.matches("+ machine.serverType = cx22").count(), 1, "{text}");
        assert!(text.contains("create a-2 (new in cloud): demand\n        (attributes as for a-1)\n"), "{text}");
        assert!(text.contains("+ machine.serverType = cx32"), "a different block is shown: {text}");
    }

    #[test]
    fn cost_lines_per_currency() {
        let hourly = [
            ("CHF".to_owned(), CostLine { before: 1.0, after: 1.0 }),
            ("EUR".to_owned(), CostLine { before: 0.0126, after: 0.0252 }),
            ("USD".to_owned(), CostLine { before: 0.5, after: 0.25 }),
        ]
        .into();
        let text = render_human(&sample(Vec::new(), hourly), &RenderOptions::default());
        assert!(text.contains("No changes.\n"));
        assert!(text.ends_with(
            "Cost: CHF 1.0000/h → CHF 1.0000/h (no change), €0.0126/h → €0.0252/h (+€0.0126/h), \
             $0.5000/h → $0.2500/h (-$0.2500/h)\n"
        ));
    }

    #[test]
    fn json_has_trailing_newline_and_round_trips() {
        let plan = sample(vec![delete_change()], BTreeMap::new());
        let json = render_json(&plan);
        assert!(json.ends_with("}\n"));
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
    }
}
