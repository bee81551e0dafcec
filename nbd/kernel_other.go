//go:build !linux

package nbd

import (
	"context"
	"errors"
)

// The kernel NBD driver is Linux's; elsewhere attaching fails cleanly.

var errKernelUnsupported = errors.New("nbd: the kernel NBD driver exists only on Linux")

// KernelAttachment is a Device served to the kernel as /dev/nbdN (Linux only).
type KernelAttachment struct {
	Index       int
	Path        string
	Method      string
	Reattached  bool
	Connections int
}

// AttachKernel fails: there is no kernel NBD driver on this system.
func AttachKernel(context.Context, Device, KernelOptions) (*KernelAttachment, error) {
	return nil, errKernelUnsupported
}

// Done is never closed.
func (a *KernelAttachment) Done() <-chan struct{} { return nil }

// Err is always nil.
func (a *KernelAttachment) Err() error { return nil }

// Detach does nothing.
func (a *KernelAttachment) Detach(context.Context) error { return nil }

// KernelStatus fails: there is no kernel NBD driver on this system.
func KernelStatus() ([]KernelDeviceStatus, error) { return nil, errKernelUnsupported }

// DisconnectKernel fails: there is no kernel NBD driver on this system.
func DisconnectKernel(int) error { return errKernelUnsupported }
