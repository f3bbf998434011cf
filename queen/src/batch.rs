//! Turning a batch of specs into tasks: ids are assigned, `ref`s used in `depends_on`
//! are resolved to those ids, cycles are refused, and the tasks are ordered so every task
//! comes after the batch tasks it depends on. Pure: `now` and the id source are given.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use shared::api::{Dependency, TaskSpec};
use shared::TaskId;

use crate::config::TaskSection;
use crate::task::Task;

/// A batch ready for the core: tasks in dependency order, and for each the index it had
/// in the request (so replies can be put back in the client's order).
#[derive(Debug)]
pub struct Plan {
    pub tasks: Vec<Task>,
    pub original_index: Vec<usize>,
}

/// Plans a batch; an error names the offending task's index.
pub fn plan(
    specs: Vec<TaskSpec>,
    now: DateTime<Utc>,
    limits: &TaskSection,
    mut next_id: impl FnMut() -> TaskId,
) -> Result<Plan, String> {
    let ids: Vec<TaskId> = specs.iter().map(|_| next_id()).collect();
    let mut by_ref: HashMap<&str, usize> = HashMap::new();
    for (i, spec) in specs.iter().enumerate() {
        if let Some(r) = &spec.reference {
            if r.is_empty() || r.len() > crate::task::MAX_NAME_LEN {
                return Err(format!(
                    "tasks[{i}].ref must be 1-{} bytes",
                    crate::task::MAX_NAME_LEN
                ));
            }
            if let Some(j) = by_ref.insert(r.as_str(), i) {
                return Err(format!(
                    "tasks[{i}].ref `{r}` is already used by tasks[{j}]"
                ));
            }
        }
    }
    // Edges inside the batch: deps[i] = batch indices task i waits for.
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); specs.len()];
    let mut resolved: Vec<Vec<Dependency>> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let mut out = Vec::with_capacity(spec.depends_on.len());
        for d in &spec.depends_on {
            match d {
                Dependency::Ref(r) => {
                    let j = *by_ref.get(r.as_str()).ok_or_else(|| {
                        format!("tasks[{i}].depends_on: unknown ref `{r}` (no task of this batch has it)")
                    })?;
                    deps[i].push(j);
                    out.push(Dependency::Id(ids[j]));
                }
                Dependency::Id(id) => {
                    if let Some(j) = ids.iter().position(|x| x == id) {
                        deps[i].push(j);
                    }
                    out.push(Dependency::Id(*id));
                }
            }
        }
        resolved.push(out);
    }
    let order = topological(&deps)
        .ok_or_else(|| "depends_on: the batch has a dependency cycle".to_string())?;

    let mut slots: Vec<Option<(TaskSpec, Vec<Dependency>)>> =
        specs.into_iter().zip(resolved).map(Some).collect();
    let mut tasks = Vec::with_capacity(order.len());
    for &i in &order {
        let Some((mut spec, deps)) = slots[i].take() else {
            continue;
        };
        spec.depends_on = deps;
        spec.reference = None;
        let task = Task::from_spec(spec, ids[i], now, limits)
            .map_err(|e| format!("invalid task spec at tasks[{i}]: {e}"))?;
        tasks.push(task);
    }
    Ok(Plan {
        tasks,
        original_index: order,
    })
}

/// Kahn's algorithm: an order where each index follows its dependencies (stable for
/// independent tasks), or None when there is a cycle.
fn topological(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = deps.len();
    let mut waiting: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &dependents[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.insert(j);
            }
        }
    }
    (order.len() == n).then_some(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(r: Option<&str>, deps: &[&str]) -> TaskSpec {
        TaskSpec {
            kind: "echo".into(),
            reference: r.map(str::to_string),
            depends_on: deps
                .iter()
                .map(|d| Dependency::Ref(d.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn run(specs: Vec<TaskSpec>) -> Result<Plan, String> {
        plan(specs, Utc::now(), &TaskSection::default(), TaskId::generate)
    }

    #[test]
    fn refs_resolve_to_ids_and_dependencies_come_first() {
        let p = run(vec![
            spec(Some("child"), &["parent"]),
            spec(Some("parent"), &[]),
        ])
        .expect("valid");
        assert_eq!(p.original_index, vec![1, 0]);
        assert_eq!(p.tasks[1].depends_on, vec![p.tasks[0].id]);
        assert_eq!(p.tasks[1].state, shared::api::TaskState::Blocked);
    }

    #[test]
    fn cycles_unknown_refs_and_duplicate_refs_are_refused() {
        let err = run(vec![spec(Some("a"), &["b"]), spec(Some("b"), &["a"])]).unwrap_err();
        assert!(err.contains("cycle"), "{err}");
        let err = run(vec![spec(Some("a"), &["a"])]).unwrap_err();
        assert!(err.contains("cycle"), "{err}");
        let err = run(vec![spec(Some("a"), &["nope"])]).unwrap_err();
        assert!(err.contains("tasks[0]") && err.contains("nope"), "{err}");
        let err = run(vec![spec(Some("a"), &[]), spec(Some("a"), &[])]).unwrap_err();
        assert!(err.contains("tasks[1]"), "{err}");
    }

    #[test]
    fn independent_tasks_keep_their_order() {
        let p = run(vec![spec(None, &[]), spec(None, &[]), spec(None, &[])]).expect("valid");
        assert_eq!(p.original_index, vec![0, 1, 2]);
    }
}
