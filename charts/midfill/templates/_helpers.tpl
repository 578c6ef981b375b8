{{/* Names, labels and computed values shared by the templates. */}}

{{- define "midfill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "midfill.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the MLflow objects (Deployment, Service, PVC): kept under 63 characters. */}}
{{- define "midfill.mlflowName" -}}
{{- printf "%s-mlflow" (include "midfill.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "midfill.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "midfill.labels" -}}
helm.sh/chart: {{ include "midfill.chart" . }}
app.kubernetes.io/name: {{ include "midfill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: midfill
{{- end }}

{{/* Selector labels of one component ("operator" or "mlflow"); pass (dict "ctx" $ "component" "..."). */}}
{{- define "midfill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "midfill.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "midfill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "midfill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: pass (dict "image" .Values.x.image "ctx" $). */}}
{{- define "midfill.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The MLflow tracking URI handed to the operator (and by it to trainer and serving pods). */}}
{{- define "midfill.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "midfill.mlflowName" .) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- else }}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled is false (the operator resolves ModelRelease aliases through it)" .Values.mlflow.externalTrackingUri }}
{{- end }}
{{- end }}

{{/* Whether the MLflow server needs a disk: SQLite backend or artifacts on the volume. */}}
{{- define "midfill.mlflowNeedsVolume" -}}
{{- if or (not .Values.mlflow.backendStore.existingSecret) (not .Values.mlflow.artifacts.destination) }}true{{ end }}
{{- end }}
