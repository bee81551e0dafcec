// Package ctxio makes long copies stop when their context ends.
package ctxio

import (
	"context"
	"io"
)

// Reader is an io.Reader that fails with the context's error once the
// context is done, so an io.Copy of a large stream can be cancelled.
type Reader struct {
	ctx context.Context
	r   io.Reader
}

// NewReader wraps r.
func NewReader(ctx context.Context, r io.Reader) *Reader { return &Reader{ctx: ctx, r: r} }

func (c *Reader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
