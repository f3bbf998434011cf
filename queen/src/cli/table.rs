//! Plain aligned text for people: a table of columns and a list of `label: value` fields.

use std::io::{self, Write};

/// Columns separated by two spaces, numbers right-aligned, no trailing whitespace.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    /// Right-aligned columns (counts).
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: AsRef<str>>(header: &[S]) -> Table {
        Table {
            header: header.iter().map(|h| h.as_ref().to_string()).collect(),
            right: vec![false; header.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns the named columns.
    pub fn right<S: AsRef<str>>(mut self, columns: &[S]) -> Table {
        for (i, h) in self.header.iter().enumerate() {
            if columns.iter().any(|c| c.as_ref() == h) {
                self.right[i] = true;
            }
        }
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let width = widths.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(cell.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right.get(i).copied().unwrap_or(false) {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `label:` then the value, labels padded to one width; a multi-line value is indented
/// under its label.
pub fn fields(out: &mut impl Write, fields: &[(&str, String)]) -> io::Result<()> {
    let width = fields.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 1;
    for (label, value) in fields {
        if value.contains('\n') {
            writeln!(out, "{label}:")?;
            for line in value.lines() {
                writeln!(out, "  {line}")?;
            }
        } else {
            writeln!(out, "{:width$} {value}", format!("{label}:"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_numbers_align_right() {
        let mut t = Table::new(&["NAME", "N", "NOTE"]).right(&["N"]);
        t.row(vec!["a".into(), "10".into(), "x".into()]);
        t.row(vec!["long-name".into(), "2".into(), String::new()]);
        let mut out = Vec::new();
        t.write(&mut out).expect("write to memory");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "NAME        N  NOTE\na          10  x\nlong-name   2\n"
        );
    }
}
