package regclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"time"
)

// send sends one request under a stall watch. On success the response body
// is watched too and must be closed; the request slot is the caller's.
func (c *Client) send(ctx context.Context, hc *http.Client, method, url string, header http.Header) (*http.Response, error) {
	w := newStallWatch(ctx, c.opts.StallTimeout)
	req, err := http.NewRequestWithContext(w.ctx, method, url, nil)
	if err != nil {
		w.close()
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	c.requests.Add(1)
	w.arm()
	resp, err := hc.Do(req)
	w.disarm()
	if err != nil {
		w.close()
		return nil, classify(ctx, w.explain(err))
	}
	resp.Body = &stallBody{rc: resp.Body, w: w}
	return resp, nil
}

// bodyError marks an error while reading a body retryable unless the
// caller gave up.
func bodyError(ctx context.Context, err error) error {
	if err == nil || ctx.Err() != nil || errors.Is(err, ErrTooLarge) {
		return err
	}
	return retryErr{err}
}

// stallWatch cancels a request's context when the request has waited too
// long for the other side: armed while waiting for the response or for
// body bytes, disarmed while the caller works on what arrived.
type stallWatch struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer // nil: no limit
	limit  time.Duration
	fired  atomic.Bool
}

func newStallWatch(parent context.Context, limit time.Duration) *stallWatch {
	ctx, cancel := context.WithCancelCause(parent)
	w := &stallWatch{ctx: ctx, cancel: cancel}
	if limit > 0 {
		w.timer = time.AfterFunc(limit, func() {
			w.fired.Store(true)
			cancel(&stallError{fmt.Sprintf("the registry sent nothing for %s", limit)})
		})
		w.timer.Stop()
		w.limit = limit
	}
	return w
}

func (w *stallWatch) arm() {
	if w.timer != nil {
		w.timer.Reset(w.limit)
	}
}

func (w *stallWatch) disarm() {
	if w.timer != nil {
		w.timer.Stop()
	}
}

// explain replaces the context error a stall caused with what happened.
func (w *stallWatch) explain(err error) error {
	if err != nil && w.fired.Load() {
		return context.Cause(w.ctx)
	}
	return err
}

func (w *stallWatch) close() {
	w.disarm()
	w.cancel(nil)
}

// stallBody is a response body under a stallWatch.
type stallBody struct {
	rc io.ReadCloser
	w  *stallWatch
}

func (b *stallBody) Read(p []byte) (int, error) {
	b.w.arm()
	n, err := b.rc.Read(p)
	b.w.disarm()
	return n, b.w.explain(err)
}

func (b *stallBody) Close() error {
	err := b.rc.Close()
	b.w.close()
	return err
}

// ErrNotFound is wrapped by the error of a request the registry answered
// with 404 (blob, manifest, tag or repository unknown).
var ErrNotFound = errors.New("not found")

// StatusError is a registry answer other than the one asked for, with the
// error codes and messages of its JSON body (the distribution spec's
// {"errors":[{"code","message","detail"}]}). The details are left out:
// they repeat the digest or name the caller already gave.
type StatusError struct {
	StatusCode int
	Status     string   // "404 Not Found"
	Errors     []string // "BLOB_UNKNOWN: blob unknown to registry"
}

func (e *StatusError) Error() string {
	s := "HTTP " + e.Status
	if len(e.Errors) > 0 {
		s += " (" + strings.Join(e.Errors, "; ") + ")"
	}
	return s
}

func (e *StatusError) Is(target error) bool {
	return target == ErrNotFound && e.StatusCode == http.StatusNotFound
}

// statusError reads the error body (a bounded amount) and returns the
// StatusError, marked retryable for 408, 429 and 5xx.
func statusError(resp *http.Response) error {
	e := &StatusError{StatusCode: resp.StatusCode, Status: resp.Status}
	if e.Status == "" {
		e.Status = fmt.Sprint(resp.StatusCode)
	}
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var body struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if json.Unmarshal(raw, &body) == nil {
		for _, d := range body.Errors {
			if len(e.Errors) == 3 {
				e.Errors = append(e.Errors, "...")
				break
			}
			s := clip(d.Code, 40)
			if d.Message != "" {
				s += ": " + clip(d.Message, 100)
			}
			e.Errors = append(e.Errors, s)
		}
	}
	if retryableStatus(resp.StatusCode) {
		return retryErr{e}
	}
	return e
}

// clip keeps what a hostile registry sends from filling the screen.
func clip(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > n {
		return strings.ToValidUTF8(s[:n], "") + "..."
	}
	return s
}

// ErrTooLarge is wrapped by ReadLimited's error.
var ErrTooLarge = errors.New("over the size limit")

// ReadLimited reads all of r, failing once it passes limit bytes: what a
// registry or a layout sends is read into memory only up to a cap.
func ReadLimited(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("more than %d bytes: %w", limit, ErrTooLarge)
	}
	return b, nil
}
