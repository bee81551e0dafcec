package main

import (
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progressMinBytes is the work below which a bar would only flicker.
const progressMinBytes = 64 << 20

// newProgress returns a byte-progress callback that draws a bar on stderr
// when it is a terminal and the work is large, and a finish function to
// call when done. Off a terminal (CI, pipes) it draws nothing.
func newProgress(total int64, description string) (update func(done int64), finish func()) {
	if total < progressMinBytes || !term.IsTerminal(int(os.Stderr.Fd())) {
		return func(int64) {}, func() {}
	}
	bar := progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetDescription(description),
		progressbar.OptionShowBytes(true),
		progressbar.OptionShowTotalBytes(true),
		progressbar.OptionUseIECUnits(true),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionClearOnFinish(),
		progressbar.OptionFullWidth(),
	)
	return func(done int64) { _ = bar.Set64(done) }, func() { _ = bar.Finish() }
}
