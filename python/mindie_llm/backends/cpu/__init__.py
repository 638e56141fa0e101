# SPDX-License-Identifier: Apache-2.0
"""The CPU backend: its platform (``platform.CpuPlatform``) and op table (``ops``). Importing the
package imports neither; the platform registers the ops when asked."""
