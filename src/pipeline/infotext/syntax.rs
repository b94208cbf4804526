//! The text format: A1111's `parse_generation_parameters` (`modules/infotext_utils.py`),
//! its `re_param` regex emulated exactly, and the writer that reads back unchanged.
//!
//! The last line holds the parameters only if `re_param` finds at least 3 of them there;
//! otherwise it belongs to the prompt.

use std::fmt::Display;
use std::str::FromStr;

use super::Infotext;

impl Infotext {
    /// Parses `text` as A1111 does. Never fails: text without a parameter line is all prompt.
    pub fn parse(text: &str) -> Infotext {
        let mut lines: Vec<&str> = py_strip(text).split('\n').collect();
        let mut last = lines.pop().unwrap_or("");
        let found = find_params(last);
        if found.len() < 3 {
            lines.push(last);
            last = "";
        }

        let (mut prompt, mut negative_prompt) = (String::new(), String::new());
        let mut done_with_prompt = false;
        for line in lines {
            let mut line = py_strip(line);
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                done_with_prompt = true;
                line = py_strip(rest);
            }
            // A1111 joins with "\n" only once the text so far is non-empty.
            let out = if done_with_prompt { &mut negative_prompt } else { &mut prompt };
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(line);
        }

        let params = if last.is_empty() { Vec::new() } else { found };
        let params = params
            .into_iter()
            // A1111 fails on `v[0]` of an empty value and skips that parameter.
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| {
                let v = if v.starts_with('"') && v.ends_with('"') { unquote(&v).unwrap_or(v) } else { v };
                (k, v)
            })
            .collect();
        Infotext { prompt, negative_prompt, params }
    }

    /// The value of `key` (its last occurrence). Like A1111, `"<key>-1"` / `"<key>-2"` give
    /// the two halves of a `WxH` value, e.g. `Size-1` is the width of `Size: 512x768`.
    pub fn get(&self, key: &str) -> Option<&str> {
        for (k, v) in self.params.iter().rev() {
            if k == key {
                return Some(v);
            }
            if let Some((w, h)) = image_size(v)
                && key.len() == k.len() + 2
                && key.starts_with(k.as_str())
            {
                match &key[k.len()..] {
                    "-1" => return Some(w),
                    "-2" => return Some(h),
                    _ => {}
                }
            }
        }
        None
    }

    /// The value of `key` parsed as `T` (surrounding whitespace ignored, as Python's `int()`
    /// and `float()` do); `Ok(None)` when absent, an error naming the key and value when bad.
    pub fn get_parsed<T: FromStr>(&self, key: &str) -> Result<Option<T>, String>
    where
        T::Err: Display,
    {
        let Some(v) = self.get(key) else { return Ok(None) };
        py_strip(v).parse::<T>().map(Some).map_err(|e| bad_value(key, v, &e.to_string()))
    }

    /// `Size: WxH` as `(width, height)`.
    pub fn size(&self) -> Result<Option<(usize, usize)>, String> {
        self.dims("Size")
    }

    /// Any `WxH` value as `(width, height)`, e.g. the old hires fix's `Hires resize` and
    /// `First pass size`.
    pub fn dims(&self, key: &str) -> Result<Option<(usize, usize)>, String> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let (w, h) = image_size(v).ok_or_else(|| bad_value(key, v, "expected WIDTHxHEIGHT"))?;
        let num = |s: &str| s.parse::<usize>().map_err(|e| bad_value(key, v, &e.to_string()));
        Ok(Some((num(w)?, num(h)?)))
    }
}

/// The text A1111 writes: the prompt, `Negative prompt: ...` when there is one, and the
/// `Key: value, ...` line with each value quoted where it must be.
impl std::fmt::Display for Infotext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.prompt)?;
        if !self.negative_prompt.is_empty() {
            write!(f, "\nNegative prompt: {}", self.negative_prompt)?;
        }
        let params = self.params.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect::<Vec<_>>();
        write!(f, "\n{}", params.join(", "))
    }
}

/// A value as it must be written after `Key: ` to read back unchanged: JSON-quoted when it
/// holds `,`, `:` or a newline (where A1111's `quote` quotes), and also when it holds `"`,
/// is empty, or starts or ends with whitespace (which A1111 would lose or misread).
pub fn quote(value: &str) -> String {
    let needs = value.is_empty()
        || value.contains([',', ':', '\n', '"'])
        || value.starts_with(is_py_space)
        || value.ends_with(is_py_space);
    if !needs {
        return value.to_string();
    }
    // Python's `json.dumps(value, ensure_ascii=False)`.
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn bad_value(key: &str, value: &str, why: &str) -> String {
    format!("bad infotext value for {key:?}: {value:?} ({why})")
}

/// Python's `str.isspace`, which `str.strip()` and the regex `\s` use.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// The regex `\w` (Unicode letters and digits, and `_`).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// A1111's `re_imagesize`, `^(\d+)x(\d+)$` (where `$` also matches before a final newline).
fn image_size(v: &str) -> Option<(&str, &str)> {
    let v = v.strip_suffix('\n').unwrap_or(v);
    let (w, h) = v.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(w) && digits(h)).then_some((w, h))
}

/// `re_param.findall(line)` for A1111's
/// `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`: the (key, raw value) pairs.
fn find_params(line: &str) -> Vec<(String, String)> {
    let c: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut p = 0;
    while p < c.len() {
        match match_param(&c, p) {
            Some((k, v, end)) => {
                out.push((k, v));
                p = end;
            }
            None => p += 1,
        }
    }
    out
}

/// One `re_param` match starting at `p`: (key, raw value, end). The key is a maximal run
/// of `[\w \-/]` (so it can't backtrack to another `:`), and `[^,]*` always matches, so
/// this needs no general backtracking.
fn match_param(c: &[char], p: usize) -> Option<(String, String, usize)> {
    let n = c.len();
    let skip_space = |mut i: usize| {
        while i < n && is_py_space(c[i]) {
            i += 1;
        }
        i
    };
    let key_start = skip_space(p);
    if key_start >= n || !is_word(c[key_start]) {
        return None;
    }
    let mut i = key_start + 1;
    while i < n && (is_word(c[i]) || matches!(c[i], ' ' | '-' | '/')) {
        i += 1;
    }
    if i - key_start < 2 || i >= n || c[i] != ':' {
        return None;
    }
    let key: String = c[key_start..i].iter().collect();
    let vs = skip_space(i + 1);
    // First alternative: a quoted string followed by `,` or the end.
    if let Some(qe) = quoted_end(c, vs)
        && (qe == n || c[qe] == ',')
    {
        return Some((key, c[vs..qe].iter().collect(), (qe + 1).min(n)));
    }
    // Second: `[^,]*`.
    let mut e = vs;
    while e < n && c[e] != ',' {
        e += 1;
    }
    Some((key, c[vs..e].iter().collect(), (e + 1).min(n)))
}

/// Where `"(?:\\.|[^\\"])+"` starting at `i` ends (just past the closing quote). The inner
/// part can never step over an unescaped `"`, so the first one closes it.
fn quoted_end(c: &[char], i: usize) -> Option<usize> {
    if c.get(i) != Some(&'"') {
        return None;
    }
    let (mut j, mut units) = (i + 1, 0);
    loop {
        match *c.get(j)? {
            '\\' if c.get(j + 1).is_some_and(|&d| d != '\n') => j += 2,
            '\\' => return None,
            '"' => return (units > 0).then_some(j + 1),
            _ => j += 1,
        }
        units += 1;
    }
}

/// Python's `json.loads` of a whole value that starts and ends with `"`; `None` where it
/// would raise (A1111 then keeps the raw text) or would give a lone surrogate.
fn unquote(s: &str) -> Option<String> {
    let mut chars = s.strip_prefix('"')?.chars();
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return chars.next().is_none().then_some(out),
            c if (c as u32) < 0x20 => return None,
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                '/' => out.push('/'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'u' => {
                    let hi = hex4(&mut chars)?;
                    let code = if (0xd800..0xdc00).contains(&hi) {
                        if chars.next()? != '\\' || chars.next()? != 'u' {
                            return None;
                        }
                        let lo = hex4(&mut chars)?;
                        if !(0xdc00..0xe000).contains(&lo) {
                            return None;
                        }
                        0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                    } else {
                        hi
                    };
                    out.push(char::from_u32(code)?);
                }
                _ => return None,
            },
            c => out.push(c),
        }
    }
}

fn hex4(chars: &mut std::str::Chars) -> Option<u32> {
    (0..4).try_fold(0, |acc, _| Some(acc * 16 + chars.next()?.to_digit(16)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(it: &Infotext) -> Vec<(&str, &str)> {
        it.params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn sdw_infotext() {
        let text = "a cat, <lora:me:0.8>, embx\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, \
                    Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: abcdef0123, \
                    Model: name, Clip skip: 2, Lora hashes: \"me: 0123456789ab\", TI hashes: \"x: 0123456789ab\", \
                    RNG: NV, Version: sdw 0.1.0";
        let it = Infotext::parse(text);
        assert_eq!(it.prompt, "a cat, <lora:me:0.8>, embx");
        assert_eq!(it.negative_prompt, "blurry");
        assert_eq!(
            params(&it),
            [
                ("Steps", "20"),
                ("Sampler", "DPM++ 2M"),
                ("Schedule type", "Karras"),
                ("CFG scale", "7"),
                ("Seed", "42"),
                ("Size", "512x768"),
                ("Model hash", "abcdef0123"),
                ("Model", "name"),
                ("Clip skip", "2"),
                ("Lora hashes", "me: 0123456789ab"),
                ("TI hashes", "x: 0123456789ab"),
                ("RNG", "NV"),
                ("Version", "sdw 0.1.0"),
            ]
        );
        assert_eq!(it.get_parsed::<u32>("Steps"), Ok(Some(20)));
        assert_eq!(it.get_parsed::<f32>("CFG scale"), Ok(Some(7.0)));
        assert_eq!(it.get_parsed::<u64>("Seed"), Ok(Some(42)));
        assert_eq!(it.get_parsed::<usize>("Clip skip"), Ok(Some(2)));
        assert_eq!(it.size(), Ok(Some((512, 768))));
        assert_eq!(it.get("Size-1"), Some("512"));
        assert_eq!(it.get("Size-2"), Some("768"));
        assert_eq!(it.get("Denoising strength"), None);
        assert_eq!(it.get_parsed::<f32>("Denoising strength"), Ok(None));
    }

    #[test]
    fn round_trip_through_quote() {
        let fields = [
            ("Steps", "30"),
            ("Sampler", "Euler a"),
            ("CFG scale", "5.5"),
            ("Seed", "4040056495"),
            ("Size", "768x512"),
            ("Denoising strength", "0.6"),
            ("Variation seed", "5"),
            ("Variation seed strength", "0.3"),
            ("Hires upscale", "2"),
            ("Hires steps", "10"),
            ("Hires upscaler", "Latent (nearest-exact)"),
            ("Mask blur", "4"),
            ("Batch size", "2"),
            ("Lora hashes", "a: 1, b: 2"),
            ("Model", "weird: name, \"quoted\" \\ back\\slash"),
            ("Note", "line\nbreak\ttab\u{1}"),
            ("Empty", ""),
            ("Spaced", "  padded "),
            ("Unicode", "café 🐱"),
            ("Version", "sdw 0.1.0"),
        ];
        let line = fields.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect::<Vec<_>>().join(", ");
        let text = format!("prompt\nNegative prompt: neg\n{line}");
        let it = Infotext::parse(&text);
        assert_eq!(it.prompt, "prompt");
        assert_eq!(it.negative_prompt, "neg");
        assert_eq!(params(&it), fields);
        assert_eq!(it.dims("Size"), Ok(Some((768, 512))));
        assert_eq!(it.get_parsed::<f32>("Hires upscale"), Ok(Some(2.0)));
        assert_eq!(it.get_parsed::<u32>("Hires steps"), Ok(Some(10)));
    }

    #[test]
    fn a1111_infotext() {
        let text = "masterpiece, best quality, 1girl, <lora:add_detail:0.8>, city street at night, \
                    (neon lights:1.2)\n\
                    Negative prompt: (worst quality, low quality:1.4), easynegative\n\
                    Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, \
                    Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, \
                    Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
                    Lora hashes: \"add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef\", \
                    TI hashes: \"easynegative: c74b4e810b03\", Version: v1.10.1";
        let it = Infotext::parse(text);
        assert_eq!(
            it.prompt,
            "masterpiece, best quality, 1girl, <lora:add_detail:0.8>, city street at night, (neon lights:1.2)"
        );
        assert_eq!(it.negative_prompt, "(worst quality, low quality:1.4), easynegative");
        assert_eq!(it.params.len(), 16);
        assert_eq!(it.get("Sampler"), Some("DPM++ 2M"));
        assert_eq!(it.get("Model"), Some("v1-5-pruned-emaonly"));
        assert_eq!(it.get_parsed::<f64>("Denoising strength"), Ok(Some(0.7)));
        assert_eq!(it.get_parsed::<f32>("Hires upscale"), Ok(Some(2.0)));
        assert_eq!(it.get_parsed::<u32>("Hires steps"), Ok(Some(15)));
        assert_eq!(it.get("Hires upscaler"), Some("R-ESRGAN 4x+ Anime6B"));
        assert_eq!(it.get("Lora hashes"), Some("add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"));
        assert_eq!(it.get("TI hashes"), Some("easynegative: c74b4e810b03"));
        assert_eq!(it.get("Version"), Some("v1.10.1"));
        assert_eq!(it.size(), Ok(Some((512, 768))));
    }

    #[test]
    fn old_hires_fix_sizes() {
        let text =
            "a\nSteps: 20, Size: 512x512, First pass size: 0x0, Hires resize: 1024x1536, Denoising strength: 0.5";
        let it = Infotext::parse(text);
        assert_eq!(it.dims("First pass size"), Ok(Some((0, 0))));
        assert_eq!(it.dims("Hires resize"), Ok(Some((1024, 1536))));
        assert_eq!(it.get("Hires resize-2"), Some("1536"));
        assert_eq!(it.get("Steps-1"), None);
    }

    #[test]
    fn no_negative_prompt() {
        let it = Infotext::parse("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512");
        assert_eq!(it.prompt, "a cat");
        assert_eq!(it.negative_prompt, "");
        assert_eq!(it.get("Seed"), Some("1"));
    }

    #[test]
    fn multi_line_prompts() {
        let text = "  first line\n\nthird line  \nNegative prompt:   bad hands\n  ugly\n\
                    Steps: 20, Sampler: Euler, Seed: 3\n";
        let it = Infotext::parse(text);
        assert_eq!(it.prompt, "first line\n\nthird line");
        assert_eq!(it.negative_prompt, "bad hands\nugly");
        assert_eq!(it.params.len(), 3);
        // Windows line ends: every prompt line is stripped.
        let it = Infotext::parse("a\r\nb\r\nNegative prompt: c\r\nd\r\nSteps: 1, Seed: 2, Size: 8x8\r\n");
        assert_eq!((it.prompt.as_str(), it.negative_prompt.as_str()), ("a\nb", "c\nd"));
        assert_eq!(it.size(), Ok(Some((8, 8))));
        // An empty "Negative prompt:" line: A1111 then joins the next line without "\n".
        let it = Infotext::parse("p\nNegative prompt:\nn\nSteps: 1, Seed: 2, Size: 8x8");
        assert_eq!(it.negative_prompt, "n");
    }

    #[test]
    fn no_parameter_line() {
        let it = Infotext::parse("a photo\nof a cat");
        assert_eq!(it, Infotext { prompt: "a photo\nof a cat".into(), ..Default::default() });
        assert_eq!(Infotext::parse(""), Infotext::default());
        assert_eq!(Infotext::parse("  \n "), Infotext::default());
        // Fewer than 3 parameters: the last line is prompt (or negative prompt) text.
        let it = Infotext::parse("a cat\nStyle: oil, Steps: 20");
        assert_eq!(it.prompt, "a cat\nStyle: oil, Steps: 20");
        assert!(it.params.is_empty());
        let it = Infotext::parse("a cat\nNegative prompt: dog\nquality: low, mood: dark");
        assert_eq!(it.negative_prompt, "dog\nquality: low, mood: dark");
        assert!(it.params.is_empty());
        // A single line with 3 parameters has an empty prompt.
        let it = Infotext::parse("Steps: 20, Seed: 1, Size: 64x64");
        assert_eq!((it.prompt.as_str(), it.params.len()), ("", 3));
    }

    #[test]
    fn quoted_values() {
        let text = r#"p
Steps: 1, Template: "say \"hi\", then \\ leave", Uni: "caf\u00e9 \ud83d\udc31 \/", Bad: "a\q, b", Next: 2"#;
        let it = Infotext::parse(text);
        assert_eq!(it.get("Template"), Some(r#"say "hi", then \ leave"#));
        assert_eq!(it.get("Uni"), Some("café 🐱 /"));
        // Invalid JSON stays as written, as A1111's unquote leaves it.
        assert_eq!(it.get("Bad"), Some(r#""a\q, b""#));
        assert_eq!(it.get("Next"), Some("2"));
        assert_eq!(quote(r#"say "hi", then \ leave"#), r#""say \"hi\", then \\ leave""#);
        assert_eq!(quote("plain value"), "plain value");
        assert_eq!(quote("a: b"), r#""a: b""#);
        assert_eq!(quote("\u{1f}"), r#""\u001f""#);
        // A quote not followed by `,` falls back to `[^,]*`, splitting at the comma.
        let it = Infotext::parse("p\nSteps: 1, Ab: \"x, y\" z, Seed: 2");
        assert_eq!(params(&it), [("Steps", "1"), ("Ab", "\"x"), ("Seed", "2")]);
        // Quotes inside an unquoted value are kept.
        let it = Infotext::parse("p\nSteps: 1, Ab: say \"hi\", Seed: 2, Bc: \"x\" \"y\"");
        assert_eq!(it.get("Ab"), Some(r#"say "hi""#));
        assert_eq!(it.get("Bc"), Some(r#""x" "y""#));
    }

    #[test]
    fn re_param_details() {
        // Empty values are dropped (A1111 fails on them), duplicates: the last wins, keys need
        // 2+ characters, text between parameters is skipped, and `""` reads as empty.
        let it = Infotext::parse("p\nSteps: 1, Empty: , x: 5, Seed: 2, junk, Steps: 3, Ee: \"\", A-b/c d: v");
        assert_eq!(params(&it), [("Steps", "1"), ("Seed", "2"), ("Steps", "3"), ("Ee", ""), ("A-b/c d", "v")]);
        assert_eq!(it.get("Steps"), Some("3"));
        // Whitespace around values: leading skipped, trailing kept (but ignored by get_parsed).
        let it = Infotext::parse("p\nSteps:   20 , Seed:7,CFG scale: 7.5");
        assert_eq!(params(&it), [("Steps", "20 "), ("Seed", "7"), ("CFG scale", "7.5")]);
        assert_eq!(it.get_parsed::<u32>("Steps"), Ok(Some(20)));
    }

    #[test]
    fn bad_values() {
        let it = Infotext::parse("p\nSteps: 2o, Seed: -1, Size: 512x, CFG scale: seven");
        assert_eq!(
            it.get_parsed::<u32>("Steps"),
            Err(r#"bad infotext value for "Steps": "2o" (invalid digit found in string)"#.into())
        );
        assert_eq!(it.get_parsed::<i64>("Seed"), Ok(Some(-1)));
        let err = it.get_parsed::<f32>("CFG scale").unwrap_err();
        assert!(err.contains("CFG scale") && err.contains("seven"), "{err}");
        assert_eq!(it.size(), Err(r#"bad infotext value for "Size": "512x" (expected WIDTHxHEIGHT)"#.into()));
        assert_eq!(it.get("Size-1"), None);
        let it = Infotext::parse("p\nSteps: 1, Seed: 2, Size: 99999999999999999999999x8");
        assert!(it.size().unwrap_err().contains("too large"));
    }
}
