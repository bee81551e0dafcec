package main

import (
	"fmt"
	"os"
	"regexp"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progressMinBytes is the work below which a bar would only flicker.
const progressMinBytes = 64 << 20

// rateWindow is how far back the rate shown looks: long enough to smooth
// bursts, short enough that a jump at the start (work found already done)
// does not show as an absurd rate for long.
const rateWindow = 3 * time.Second

// progress draws one byte-progress bar on stderr when it is a terminal and
// the work is large; off a terminal (CI, pipes) or with --quiet it draws
// nothing. Its methods may be called from several goroutines.
type progress struct {
	mu      sync.Mutex
	bar     *progressbar.ProgressBar // nil: draws nothing
	label   string
	total   int64
	samples []progressSample // within rateWindow, oldest first
}

type progressSample struct {
	at   time.Time
	done int64
}

// quietProgress is set by --quiet: no bars at all.
var quietProgress bool

func startProgress(total int64, label string) *progress {
	p := &progress{label: shortLabel(label), total: total}
	if quietProgress || total < progressMinBytes || !term.IsTerminal(int(os.Stderr.Fd())) {
		return p
	}
	// The bar draws the saucer only; sizes, the rate and the time left
	// are ours (progressbar's rate averages from the start, so work found
	// already done showed as hundreds of GiB/s).
	p.bar = progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetDescription(p.label),
		progressbar.OptionShowDescriptionAtLineEnd(),
		progressbar.OptionSetElapsedTime(false),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish(),
		progressbar.OptionSetWidth(30),
	)
	return p
}

// Set reports the bytes done so far.
func (p *progress) Set(done int64) {
	if p.bar == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	p.samples = append(p.samples, progressSample{now, done})
	for len(p.samples) > 2 && now.Sub(p.samples[1].at) > rateWindow {
		p.samples = p.samples[1:]
	}
	p.bar.Describe(p.describe(now, done))
	_ = p.bar.Set64(done)
}

// SetTotal changes the work to do, such as when part of it turns out to
// be done already.
func (p *progress) SetTotal(total int64) {
	if p.bar == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.total = total
	p.samples = p.samples[:0] // the rate starts again
	p.bar.ChangeMax64(total)
}

// Finish removes the bar.
func (p *progress) Finish() {
	if p.bar == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	_ = p.bar.Finish()
	p.bar = nil
}

// describe is the text beside the bar: "export  1.2/4.0 GiB  310 MiB/s  9s".
func (p *progress) describe(now time.Time, done int64) string {
	s := fmt.Sprintf("%s %s/%s", p.label, shortBytes(done), shortBytes(p.total))
	if len(p.samples) < 2 {
		return s
	}
	first := p.samples[0]
	span := now.Sub(first.at)
	if span < 500*time.Millisecond {
		return s
	}
	rate := float64(done-first.done) / span.Seconds()
	s += fmt.Sprintf(" %s/s", shortBytes(int64(rate)))
	if rate > 0 && done < p.total {
		s += " " + (time.Duration(float64(p.total-done)/rate) * time.Second).Round(time.Second).String()
	}
	return s
}

// newProgress is startProgress as two functions, for callers with one bar.
func newProgress(total int64, label string) (update func(done int64), finish func()) {
	p := startProgress(total, label)
	return p.Set, p.Finish
}

// longHex is a digest or blob id in a label.
var longHex = regexp.MustCompile(`[0-9a-f]{16,}`)

// shortLabel shortens digests in a label to their first 12 hex digits, so
// that the bar keeps its width on an 80-column terminal.
func shortLabel(label string) string {
	return longHex.ReplaceAllStringFunc(label, func(h string) string { return h[:12] + "…" })
}
