//! AUTOMATIC1111's prompt editing `[from:to:when]` and alternation `[a|b]`: which text is in
//! force at which sampling step.
//!
//! Mirrors `get_learned_conditioning_prompt_schedules` in stable-diffusion-webui
//! `modules/prompt_parser.py` (1.6+ "new" scheduling, `use_old_scheduling=False`), whose lark
//! grammar is:
//!
//! ```text
//! !start: (prompt | /[][():]/+)*
//! prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
//! !emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
//! scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
//! alternate: "[" prompt ("|" [prompt])+ "]"
//! WHITESPACE: /\s+/
//! plain: /([^\\\[\]():|]|\\.)+/
//! %import common.SIGNED_NUMBER -> NUMBER
//! ```
//!
//! Here a hand-written recursive-descent parser replaces lark. Inside brackets the grammar is
//! unambiguous; at the top level unmatched `[ ] ( ) :` are kept as literal text, and a bracket
//! that parses as an element is preferred over reading it as literals. For well-formed prompts
//! that is lark's only parse; where stray brackets make the grammar ambiguous (`([a:3]:`), lark's
//! Earley resolution varies with Python's hash seed, and this is one of its outcomes.
//!
//! Emphasis and escapes pass through unchanged: the output text is parsed for emphasis later
//! (`prompt.rs`). A prompt the grammar rejects (a `|` outside an alternation, a trailing `\`)
//! becomes a single entry holding the whole prompt, like A1111.
//!
//! Switch points: a NUMBER containing `.` is a fraction of the steps, otherwise a step number;
//! it is truncated and clamped to `steps`, and only values >= 1 start a new entry. Any
//! alternation makes every step 1..=steps an entry.

use std::collections::BTreeSet;

/// One entry of a schedule: `text` is used up to and including step `end_at_step`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledPrompt {
    pub end_at_step: usize,
    pub text: String,
}

/// The schedule of `prompt` over `steps` sampling steps
/// (A1111's `get_learned_conditioning_prompt_schedules([prompt], steps)[0]`).
pub fn prompt_schedule(prompt: &str, steps: usize) -> Vec<ScheduledPrompt> {
    schedule_with(prompt, Timing { steps, int_offset: 0.0, flt_offset: 0.0 })
}

/// The schedule for the hires-fix pass (A1111's `hires_steps` argument): switch points count on
/// from the first pass, so a step number `n` means hires step `n - base_steps` and a fraction
/// `f` means `(f - 1) * hires_steps`; edits that finished in the first pass are already applied.
pub fn prompt_schedule_hires(prompt: &str, base_steps: usize, hires_steps: usize) -> Vec<ScheduledPrompt> {
    schedule_with(prompt, Timing { steps: hires_steps, int_offset: base_steps as f64, flt_offset: 1.0 })
}

/// Index of the entry in force at 0-based denoiser call `step`, given each entry's
/// `end_at_step`, as A1111's `reconstruct_cond_batch`: the first entry with
/// `step <= end_at_step`, else entry 0. A1111 counts UNet calls, so with a two-call sampler
/// (Heun, DPM2) the count passes `steps` and the schedule starts over; kept for A1111's images.
pub fn entry_at(ends: impl IntoIterator<Item = usize>, step: usize) -> usize {
    ends.into_iter().position(|end| step <= end).unwrap_or(0)
}

/// How NUMBER tokens map to steps of the pass being scheduled.
#[derive(Clone, Copy)]
struct Timing {
    steps: usize,
    int_offset: f64,
    flt_offset: f64,
}

impl Timing {
    /// A1111's `min(steps, int(v))`, with `v` a fraction of steps when the token has a `.`.
    fn switch_step(&self, number: &str) -> i64 {
        let v: f64 = number.parse().unwrap_or(0.0);
        let v = if number.contains('.') { (v - self.flt_offset) * self.steps as f64 } else { v - self.int_offset };
        let steps = self.steps as i64;
        if v >= steps as f64 { steps } else { v as i64 }
    }
}

fn schedule_with(prompt: &str, timing: Timing) -> Vec<ScheduledPrompt> {
    let chars: Vec<char> = prompt.chars().collect();
    let Some(tree) = (Parser { s: &chars, pos: 0, depth: 0 }).start() else {
        return vec![ScheduledPrompt { end_at_step: timing.steps, text: prompt.to_string() }];
    };
    let mut ends = BTreeSet::from([timing.steps]);
    collect_steps(&tree, timing, &mut ends);
    ends.into_iter()
        .map(|end| {
            let mut text = String::new();
            render(&tree, end as i64, timing, &mut text);
            ScheduledPrompt { end_at_step: end, text }
        })
        .collect()
}

/// Parsed prompt. Emphasis brackets are kept as `Text`, so only what varies is structured.
#[derive(Debug)]
enum Node {
    Text(String),
    Scheduled { before: Vec<Node>, after: Vec<Node>, number: String },
    Alternate(Vec<Vec<Node>>),
}

/// A1111's `CollectSteps` visitor: every step at which some text may change.
fn collect_steps(nodes: &[Node], timing: Timing, ends: &mut BTreeSet<usize>) {
    for node in nodes {
        match node {
            Node::Text(_) => {}
            Node::Scheduled { before, after, number } => {
                let when = timing.switch_step(number);
                if when >= 1 {
                    ends.insert(when as usize);
                }
                collect_steps(before, timing, ends);
                collect_steps(after, timing, ends);
            }
            Node::Alternate(options) => {
                ends.extend(1..=timing.steps);
                options.iter().for_each(|o| collect_steps(o, timing, ends));
            }
        }
    }
}

/// A1111's `AtStep` transformer: the text at (1-based) schedule step `step`.
fn render(nodes: &[Node], step: i64, timing: Timing, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Scheduled { before, after, number } => {
                let chosen = if step <= timing.switch_step(number) { before } else { after };
                render(chosen, step, timing, out);
            }
            Node::Alternate(options) => {
                let i = (step - 1).rem_euclid(options.len() as i64) as usize;
                render(&options[i], step, timing, out);
            }
        }
    }
}

/// Nesting beyond this fails the bracket (A1111 itself hits Python's recursion limit first);
/// it also bounds this parser's recursion.
const MAX_DEPTH: usize = 100;

/// Recursive descent over the grammar in the module docs; `None` means "does not parse here".
struct Parser<'a> {
    s: &'a [char],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        let hit = self.peek() == Some(c);
        self.pos += hit as usize;
        hit
    }

    /// `start`: elements, with unmatched `[ ] ( ) :` kept literally; `None` if anything else is left.
    fn start(&mut self) -> Option<Vec<Node>> {
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            if self.item(&mut out) {
                continue;
            }
            if !"[]():".contains(c) {
                return None;
            }
            out.push(Node::Text(c.to_string()));
            self.pos += 1;
        }
        Some(out)
    }

    /// `prompt`: as many elements as parse (possibly none).
    fn prompt(&mut self) -> Vec<Node> {
        let mut out = Vec::new();
        while self.item(&mut out) {}
        out
    }

    /// One element appended to `out`; on failure nothing is consumed.
    fn item(&mut self, out: &mut Vec<Node>) -> bool {
        let start = self.pos;
        let ok = match self.peek() {
            Some('[') | Some('(') if self.depth >= MAX_DEPTH => false,
            Some('[') => self.nested(|p| p.bracket(out)),
            Some('(') => self.nested(|p| p.paren(out)),
            Some(_) => self.plain(out),
            None => false,
        };
        if !ok {
            self.pos = start;
        }
        ok
    }

    fn nested(&mut self, f: impl FnOnce(&mut Self) -> bool) -> bool {
        self.depth += 1;
        let ok = f(self);
        self.depth -= 1;
        ok
    }

    /// `plain` (which also covers WHITESPACE): text up to a special character; `\x` escapes any
    /// character but a newline, as the regex's `.` does.
    fn plain(&mut self, out: &mut Vec<Node>) -> bool {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == '\\' {
                match self.s.get(self.pos + 1) {
                    Some(&n) if n != '\n' => self.pos += 2,
                    _ => break,
                }
            } else if "[]():|".contains(c) {
                break;
            } else {
                self.pos += 1;
            }
        }
        if self.pos == start {
            return false;
        }
        out.push(Node::Text(self.s[start..self.pos].iter().collect()));
        true
    }

    /// `"(" prompt ")"` or `"(" prompt ":" prompt ")"`, kept verbatim.
    fn paren(&mut self, out: &mut Vec<Node>) -> bool {
        self.eat('(');
        let mut inner = vec![Node::Text("(".into())];
        inner.extend(self.prompt());
        if self.eat(':') {
            inner.push(Node::Text(":".into()));
            inner.extend(self.prompt());
        }
        if !self.eat(')') {
            return false;
        }
        inner.push(Node::Text(")".into()));
        out.extend(inner);
        true
    }

    /// `[...]`: what follows the first inner prompt decides emphasis, alternation or scheduling.
    fn bracket(&mut self, out: &mut Vec<Node>) -> bool {
        self.eat('[');
        let first = self.prompt();
        match self.peek() {
            Some(']') => {
                self.pos += 1;
                out.push(Node::Text("[".into()));
                out.extend(first);
                out.push(Node::Text("]".into()));
                true
            }
            Some('|') => self.alternate(first).map(|n| out.push(n)).is_some(),
            Some(':') => {
                self.pos += 1;
                self.scheduled(first).map(|n| out.push(n)).is_some()
            }
            _ => false,
        }
    }

    /// Rest of `"[" prompt ("|" [prompt])+ "]"` after the first option.
    fn alternate(&mut self, first: Vec<Node>) -> Option<Node> {
        let mut options = vec![first];
        while self.eat('|') {
            options.push(self.prompt());
        }
        self.eat(']').then_some(Node::Alternate(options))
    }

    /// Rest of `scheduled` after the first `:`: either `when]` (so `first` is the "to" text)
    /// or `to:when]`.
    fn scheduled(&mut self, first: Vec<Node>) -> Option<Node> {
        let after_colon = self.pos;
        if let Some(number) = self.when_close() {
            return Some(Node::Scheduled { before: Vec::new(), after: first, number });
        }
        self.pos = after_colon;
        let after = self.prompt();
        if !self.eat(':') {
            return None;
        }
        let number = self.when_close()?;
        Some(Node::Scheduled { before: first, after, number })
    }

    /// `[WHITESPACE] NUMBER [WHITESPACE] "]"`, giving NUMBER's text.
    fn when_close(&mut self) -> Option<String> {
        self.skip_whitespace();
        let number = self.number()?;
        self.skip_whitespace();
        self.eat(']').then_some(number)
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// lark's `SIGNED_NUMBER`: `[+-]` then `1`, `1.`, `1.5`, `.5`, each with an optional exponent.
    fn number(&mut self) -> Option<String> {
        let start = self.pos;
        if matches!(self.peek(), Some('+' | '-')) {
            self.pos += 1;
        }
        let int_digits = self.digits();
        let frac_digits = if self.peek() == Some('.') && (int_digits > 0 || self.digit_at(self.pos + 1)) {
            self.pos += 1;
            self.digits() + 1
        } else {
            0
        };
        if int_digits + frac_digits == 0 {
            self.pos = start;
            return None;
        }
        self.exponent();
        Some(self.s[start..self.pos].iter().collect())
    }

    /// `(e|E)[+-]digits`, consumed only when complete.
    fn exponent(&mut self) {
        let start = self.pos;
        if !matches!(self.peek(), Some('e' | 'E')) {
            return;
        }
        self.pos += 1;
        if matches!(self.peek(), Some('+' | '-')) {
            self.pos += 1;
        }
        if self.digits() == 0 {
            self.pos = start;
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.digit_at(self.pos) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn digit_at(&self, i: usize) -> bool {
        self.s.get(i).is_some_and(char::is_ascii_digit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(schedule: Vec<ScheduledPrompt>) -> Vec<(usize, String)> {
        schedule.into_iter().map(|e| (e.end_at_step, e.text)).collect()
    }

    fn g(prompt: &str) -> Vec<(usize, String)> {
        pairs(prompt_schedule(prompt, 10))
    }

    fn expect(list: &[(usize, &str)]) -> Vec<(usize, String)> {
        list.iter().map(|&(s, t)| (s, t.to_string())).collect()
    }

    fn alternating(a: &str, b: &str) -> Vec<(usize, String)> {
        (1..=10).map(|s| (s, if s % 2 == 1 { a } else { b }.to_string())).collect()
    }

    // The doctests of A1111's get_learned_conditioning_prompt_schedules.

    #[test]
    fn doctest_plain() {
        assert_eq!(g("test"), expect(&[(10, "test")]));
    }

    #[test]
    fn doctest_add_at_step() {
        assert_eq!(g("a [b:3]"), expect(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [b: 3]"), expect(&[(3, "a "), (10, "a b")]));
    }

    #[test]
    fn doctest_emphasis_inside_schedule() {
        assert_eq!(g("a [[[b]]:2]"), expect(&[(2, "a "), (10, "a [[b]]")]));
        assert_eq!(g("[(a:2):3]"), expect(&[(3, ""), (10, "(a:2)")]));
    }

    #[test]
    fn doctest_from_to() {
        assert_eq!(g("a [b : c : 1] d"), expect(&[(1, "a b  d"), (10, "a  c  d")]));
    }

    #[test]
    fn doctest_nested() {
        assert_eq!(g("a[b:[c:d:2]:1]e"), expect(&[(1, "abe"), (2, "ace"), (10, "ade")]));
    }

    #[test]
    fn doctest_unbalanced() {
        assert_eq!(g("a [unbalanced"), expect(&[(10, "a [unbalanced")]));
        assert_eq!(g("((a][:b:c [d:3]"), expect(&[(3, "((a][:b:c "), (10, "((a][:b:c d")]));
    }

    #[test]
    fn doctest_fraction() {
        assert_eq!(g("a [b:.5] c"), expect(&[(5, "a  c"), (10, "a b c")]));
    }

    /// A1111's doctest expects `[[5, 'a  c'], [10, 'a {b|d{ c']]` ("not handling this right
    /// now"), but its grammar rejects a `|` outside an alternation, so A1111 (lark 1.1.2) really
    /// returns the whole prompt; we match what it does.
    #[test]
    fn doctest_pipe_outside_alternation_falls_back() {
        assert_eq!(g("a [{b|d{:.5] c"), expect(&[(10, "a [{b|d{:.5] c")]));
    }

    #[test]
    fn doctest_alternation() {
        assert_eq!(g("[a|(b:1.1)]"), alternating("a", "(b:1.1)"));
        assert_eq!(g("[fe|]male"), alternating("female", "male"));
        let cycle = ["female", "male", "male", "male"];
        let want: Vec<_> = (1..=10).map(|s| (s, cycle[(s - 1) % 4].to_string())).collect();
        assert_eq!(g("[fe|||]male"), want);
    }

    #[test]
    fn doctest_hires() {
        let h = |p| pairs(prompt_schedule_hires(p, 10, 10));
        assert_eq!(h("a [b:.5] c"), expect(&[(10, "a b c")]));
        assert_eq!(h("a [b:1.5] c"), expect(&[(5, "a  c"), (10, "a b c")]));
    }

    // Further cases, expected values taken from A1111's code run under lark 1.1.2.

    #[test]
    fn hires_step_numbers_count_from_first_pass() {
        let h = |p| pairs(prompt_schedule_hires(p, 10, 4));
        assert_eq!(h("[a:b:12]"), expect(&[(2, "a"), (4, "b")]));
        assert_eq!(h("[a:b:0.9]"), expect(&[(4, "b")]));
    }

    #[test]
    fn zero_steps() {
        assert_eq!(pairs(prompt_schedule("[a|b]", 0)), expect(&[(0, "b")]));
        assert_eq!(pairs(prompt_schedule("[a:b:3]", 0)), expect(&[(0, "a")]));
    }

    #[test]
    fn rejected_prompts_fall_back_whole() {
        assert_eq!(g("a | b"), expect(&[(10, "a | b")]));
        assert_eq!(g("a [b:3] \\"), expect(&[(10, "a [b:3] \\")]));
        assert_eq!(g("[(fe|)male:0.5]"), expect(&[(10, "[(fe|)male:0.5]")]));
    }

    #[test]
    fn number_whitespace_and_range() {
        assert_eq!(g("[a:b:3 ]"), expect(&[(3, "a"), (10, "b")]));
        assert_eq!(g("[a:b: 3 ]"), expect(&[(3, "a"), (10, "b")]));
        assert_eq!(g("[a:b:-3]"), expect(&[(10, "b")]));
        assert_eq!(g("[a:b:0]"), expect(&[(10, "b")]));
        assert_eq!(pairs(prompt_schedule("[a:b:1e1]", 5)), expect(&[(5, "a")]));
        assert_eq!(g("[a:b:0.5e1]"), expect(&[(10, "a")]));
        assert_eq!(g("[a:b:1.]"), expect(&[(10, "a")]));
    }

    #[test]
    fn malformed_brackets_stay_literal() {
        assert_eq!(g("[a:b:c:3]"), expect(&[(10, "[a:b:c:3]")]));
        assert_eq!(g("(a:b:3)"), expect(&[(10, "(a:b:3)")]));
    }

    #[test]
    fn emphasis_and_escapes_pass_through() {
        assert_eq!(g("[a:(b:1.2):3]"), expect(&[(3, "a"), (10, "(b:1.2)")]));
        assert_eq!(
            g(r"\(x\) [\[y\::z:2] <lora:n:0.5>"),
            expect(&[(2, r"\(x\) \[y\: <lora:n:0.5>"), (10, r"\(x\) z <lora:n:0.5>")])
        );
    }

    #[test]
    fn schedule_and_alternation_combined() {
        let got = pairs(prompt_schedule("[a:b:3][c|d]", 4));
        assert_eq!(got, expect(&[(1, "ac"), (2, "ad"), (3, "ac"), (4, "bd")]));
    }

    #[test]
    fn module_comment_example() {
        let p = "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]";
        assert_eq!(
            pairs(prompt_schedule(p, 100)),
            expect(&[
                (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
                (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
                (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
                (75, "fantasy landscape with a lake and an oak in background masterful"),
                (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
            ])
        );
    }

    #[test]
    fn entry_at_follows_reconstruct_cond_batch() {
        let ends: Vec<usize> = prompt_schedule("a [b:3]", 10).iter().map(|e| e.end_at_step).collect();
        assert_eq!((0..=3).map(|i| entry_at(ends.iter().copied(), i)).collect::<Vec<_>>(), [0, 0, 0, 0]);
        assert_eq!(entry_at(ends.iter().copied(), 4), 1);
        assert_eq!(entry_at(ends.iter().copied(), 9), 1);
        assert_eq!(entry_at(ends.iter().copied(), 11), 0);
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let p = format!("{}x{}", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(prompt_schedule(&p, 10).len(), 1);
    }
}
